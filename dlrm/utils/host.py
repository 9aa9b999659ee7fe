"""This host's memory as this process may use it: physical RAM capped by the cgroup limit.

Inside a container (Docker, Kubernetes, Slurm with cgroups) the physical RAM that sysconf
reports is the machine's, not the job's; a sharding planner that fills it gets the job
OOM-killed. The cgroup's limit is the real budget.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712 on
# 4 KiB pages); anything this large is no limit on any machine.
_V1_UNLIMITED = 1 << 62


def physical_bytes() -> int:
    """Physical RAM of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read_limit(path: Path) -> int | None:
    """The limit in ``path`` in bytes; None for no limit or a file that cannot be read."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":  # cgroup v2: no limit
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _V1_UNLIMITED else None


def _up_to(root: Path, cgroup: str) -> Iterator[Path]:
    """``root/cgroup`` and each parent directory up to ``root`` itself.

    Parents count because a limit on a parent cgroup caps every child; ``root`` itself
    because a container sees its own cgroup mounted there while /proc/self/cgroup may name
    the host's path for it, which does not exist inside."""
    parts = [p for p in cgroup.split("/") if p and p not in (".", "..")]
    for n in range(len(parts), -1, -1):
        yield root.joinpath(*parts[:n])


def cgroup_limit_bytes(proc_root: Path = Path("/proc"),
                       cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest memory limit over this process's cgroups (v2 and v1); None if none."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        # hierarchy-ID:controller-list:path; v2's unified hierarchy is "0::path".
        hierarchy, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2):
            continue
        if hierarchy == "0" and controllers == "":
            files = [d / "memory.max" for d in _up_to(cgroup_root, path)]
        elif "memory" in controllers.split(","):
            files = [d / "memory.limit_in_bytes" for d in _up_to(cgroup_root / "memory", path)]
        else:
            continue
        limits += [v for v in map(_read_limit, files) if v is not None]
    return min(limits, default=None)


def memory_bytes(proc_root: Path = Path("/proc"),
                 cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory this process may use: the smaller of physical RAM and its cgroup limit.

    Any cgroup file that is missing or unreadable is ignored, so outside a container (or on
    a system without cgroups) this is the physical RAM."""
    physical = physical_bytes()
    limit = cgroup_limit_bytes(proc_root, cgroup_root)
    return physical if limit is None else min(physical, limit)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
