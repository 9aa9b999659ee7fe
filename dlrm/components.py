"""torchx components: ``dlrm train`` and ``dlrm evaluate`` on any torchx scheduler.

Built on torchx's ``dist.ddp`` (torchrun with c10d rendezvous, one role of N nodes x M
processes), with the ``dlrm`` entry point, the environment a DLRM job wants and sensible
resources filled in::

    torchx run -s local_cwd dlrm/components.py:train -j 1x2 -- --config configs/tiny.toml
    torchx run -s slurm dlrm/components.py:train -j 4x8 --gpu 8 -- --config ...
    torchx run -s kubernetes -cfg queue=default dlrm/components.py:train \\
        --image REGISTRY/dlrm:TAG -j 2x8 --gpu 8 -- --config ...

Arguments after ``--`` go to ``dlrm train`` (or ``dlrm evaluate``) unchanged.
"""

# torchx reads components' signatures (its linter wants typing's Optional / Dict / List).
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

DEFAULT_IMAGE = "dlrm:latest"  # built from the repository's Dockerfile

# Automatic sizing (cpu / memMB left at 0). A GPU rank wants a few CPUs for its data loader
# and pinned-memory copies, and host memory for its batches and any embedding tables the
# planner places in DDR: 8 CPUs and 64 GiB per GPU fill a p4d / DGX-class node (8 GPUs,
# 64 CPUs, 512 GiB) without asking for more than it has. CPU-only jobs keep the small size.
CPUS_PER_GPU = 8
MEM_MB_PER_GPU = 64 * 1024
CPU_ONLY_CPUS = 2
CPU_ONLY_MEM_MB = 8192


def _resources(cpu: int, gpu: int, memMB: int) -> tuple[int, int]:
    """(cpu, memMB) per node: explicit values as given, 0 sized from the GPUs."""
    auto_cpu, auto_mem = ((CPUS_PER_GPU * gpu, MEM_MB_PER_GPU * gpu) if gpu > 0
                          else (CPU_ONLY_CPUS, CPU_ONLY_MEM_MB))
    return cpu or auto_cpu, memMB or auto_mem


def _env(env: Optional[Dict[str, str]], omp_threads: int) -> dict[str, str]:
    merged = {
        # Each rank's CPU threads (dlrm spreads a host's cores over its ranks when unset).
        **({"OMP_NUM_THREADS": str(omp_threads)} if omp_threads else {}),
        # A fresh rendezvous store per restart attempt: the shared one keeps the dead
        # ranks' addresses across restarts on multi-node jobs (pytorch/pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        # NCCL: fail fast on a hung collective instead of waiting out the timeout.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "PYTHONUNBUFFERED": "1",
    }
    merged.update(env or {})
    return merged


def _job(command: str, args: tuple[str, ...], image: str, j: str, cpu: int, gpu: int,
         memMB: int, h: Optional[str], env: Optional[Dict[str, str]], max_retries: int,
         rdzv_port: int, mounts: Optional[List[str]], omp_threads: int) -> specs.AppDef:
    cpu, memMB = _resources(cpu, gpu, memMB)  # torchx ignores all three when h is given
    return dist.ddp(command, *args, m="dlrm", image=image, name=f"dlrm-{command}", h=h,
                    cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=_env(env, omp_threads),
                    max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)


def train(*script_args: str, image: str = DEFAULT_IMAGE, j: str = "1x2", cpu: int = 0,
          gpu: int = 0, memMB: int = 0, h: Optional[str] = None,
          env: Optional[Dict[str, str]] = None, max_retries: int = 0, rdzv_port: int = 29500,
          mounts: Optional[List[str]] = None, omp_threads: int = 0) -> specs.AppDef:
    """A ``dlrm train`` job: ``j`` = NODESxPROCS_PER_NODE ranks under torchrun.

    Args:
        script_args: arguments of ``dlrm train`` (``--config``, ``--run-dir``, overrides).
        image: container image (the Dockerfile's); local_cwd runs from this checkout.
        j: nodes x processes per node, e.g. 2x8 (elastic: 1:4x8).
        cpu: CPUs per node (replica); 0: 8 per GPU, or 2 without GPUs.
        gpu: GPUs per node.
        memMB: memory per node in MB; 0: 65536 (64 GiB) per GPU, or 8192 without GPUs.
        h: a named resource of the scheduler instead of cpu / gpu / memMB.
        env: extra environment variables (they override the defaults).
        max_retries: job restarts after a failure (training resumes from its newest
            checkpoint: keep --run-dir on shared storage).
        rdzv_port: port of the c10d rendezvous on the first node.
        mounts: scheduler mounts, e.g. type=bind,src=/data,dst=/data.
        omp_threads: OMP_NUM_THREADS per rank; 0: dlrm divides the host's cores.
    """
    return _job("train", script_args, image, j, cpu, gpu, memMB, h, env, max_retries,
                rdzv_port, mounts, omp_threads)


def evaluate(*script_args: str, image: str = DEFAULT_IMAGE, j: str = "1x1", cpu: int = 0,
             gpu: int = 0, memMB: int = 0, h: Optional[str] = None,
             env: Optional[Dict[str, str]] = None, rdzv_port: int = 29500,
             mounts: Optional[List[str]] = None, omp_threads: int = 0) -> specs.AppDef:
    """A ``dlrm evaluate`` job (``--checkpoint``, ``--data``, ``--split``, ``--out``) on
    any number of ranks: see :func:`train` for the arguments."""
    return _job("evaluate", script_args, image, j, cpu, gpu, memMB, h, env, 0, rdzv_port,
                mounts, omp_threads)
