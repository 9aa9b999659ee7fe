"""dlrm.utils.host.memory_bytes: physical RAM capped by the cgroup limit, read from fake /proc and
/sys/fs/cgroup trees in real temporary directories, and once from this machine."""

from __future__ import annotations

import os
from pathlib import Path

from dlrm.utils.host import memory_bytes

MiB = 1 << 20
PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 writes for "no limit"


def _tree(tmp_path: Path, cgroup_lines: list[str] | None,
          files: dict[str, str]) -> tuple[Path, Path]:
    """(proc_root, cgroup_root): ``/proc/self/cgroup`` holds ``cgroup_lines`` (no file if
    None); ``files`` maps paths under the cgroup root to their contents."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    cgroup.mkdir()
    if cgroup_lines is not None:
        (proc / "self" / "cgroup").write_text("".join(x + "\n" for x in cgroup_lines))
    for rel, text in files.items():
        (cgroup / rel).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / rel).write_text(text + "\n")
    return proc, cgroup


def test_v2_limit(tmp_path):
    roots = _tree(tmp_path, ["0::/job/step"], {"job/step/memory.max": str(256 * MiB)})
    assert memory_bytes(*roots) == 256 * MiB


def test_v2_max_is_no_limit(tmp_path):
    roots = _tree(tmp_path, ["0::/job"], {"job/memory.max": "max", "memory.max": "max"})
    assert memory_bytes(*roots) == PHYSICAL


def test_v2_smaller_parent_caps_the_child(tmp_path):
    roots = _tree(tmp_path, ["0::/a/b/c"], {"a/memory.max": str(128 * MiB),
                                            "a/b/memory.max": "max",
                                            "a/b/c/memory.max": str(512 * MiB)})
    assert memory_bytes(*roots) == 128 * MiB


def test_v2_container_sees_its_cgroup_at_the_root(tmp_path):
    # Without a cgroup namespace /proc/self/cgroup names the host's path, absent inside.
    roots = _tree(tmp_path, ["0::/docker/0123abcd"], {"memory.max": str(300 * MiB)})
    assert memory_bytes(*roots) == 300 * MiB


def test_v1_limit(tmp_path):
    roots = _tree(tmp_path, ["5:cpu,cpuacct:/job", "4:memory:/job", "0::/"],
                  {"memory/job/memory.limit_in_bytes": str(200 * MiB),
                   "memory/memory.limit_in_bytes": V1_UNLIMITED})
    assert memory_bytes(*roots) == 200 * MiB


def test_v1_container_root_limit(tmp_path):
    roots = _tree(tmp_path, ["4:memory:/docker/0123abcd"],
                  {"memory/memory.limit_in_bytes": str(100 * MiB)})
    assert memory_bytes(*roots) == 100 * MiB


def test_v1_unlimited(tmp_path):
    roots = _tree(tmp_path, ["4:memory:/job"],
                  {"memory/job/memory.limit_in_bytes": V1_UNLIMITED,
                   "memory/memory.limit_in_bytes": V1_UNLIMITED})
    assert memory_bytes(*roots) == PHYSICAL


def test_limit_above_physical_ram_gives_physical(tmp_path):
    roots = _tree(tmp_path, ["0::/job"], {"job/memory.max": str(PHYSICAL * 4)})
    assert memory_bytes(*roots) == PHYSICAL


def test_unreadable_sources_are_ignored(tmp_path):
    roots = _tree(tmp_path, ["0::/job", "4:memory:/job", "garbage line"],
                  {"job/memory.max": "not a number", "memory/job/memory.limit_in_bytes": ""})
    assert memory_bytes(*roots) == PHYSICAL
    # A directory where the file should be cannot be read either.
    (roots[1] / "job" / "memory.max").unlink()
    (roots[1] / "job" / "memory.max").mkdir()
    assert memory_bytes(*roots) == PHYSICAL


def test_no_cgroup_file_gives_physical(tmp_path):
    roots = _tree(tmp_path, None, {"memory.max": str(64 * MiB)})
    assert memory_bytes(*roots) == PHYSICAL


def test_this_machine():
    assert 0 < memory_bytes() <= PHYSICAL
