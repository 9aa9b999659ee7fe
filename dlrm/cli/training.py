"""``dlrm train``, ``dlrm plan``, ``dlrm evaluate``, ``dlrm score``: training and
scoring checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dlrm.cli.common import error, offline_errors


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.config import load_config
    from dlrm.errors import ConfigError

    try:
        overrides = rest + ([f"--train.resume={args.resume}"] if args.resume else []) \
            + ([f"--train.init_from={args.init_from}"] if args.init_from else []) \
            + (["--train.init_from_weights_only=true"] if args.init_from_weights_only else [])
        config = load_config(args.config, overrides)
        from dlrm.train.preflight import preflight

        preflight(config)  # before any process group starts
    except (ConfigError, ValueError) as e:
        # Under torchrun every rank finds the same error: rank 0 says it. The others leave
        # a little later, so that torchrun, which stops every rank at the first one to
        # fail, does not stop rank 0 before it has.
        if int(os.environ.get("RANK", "0")) == 0:
            return error("train", e)
        time.sleep(3)
        return 2
    if args.nproc_per_node:
        # The config is good: torchrun starts the ranks, and its exit is ours.
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc_per_node}", "-m", "dlrm", "train",
                "--config", args.config, *(["--run-dir", args.run_dir] if args.run_dir else []),
                *overrides]
        sys.stdout.flush()
        os.execv(sys.executable, argv)
    from dlrm.errors import CheckpointError, DataError
    from dlrm.train.trainer import train

    try:
        train(config, args.run_dir)
    except (CheckpointError, ConfigError) as e:
        # Every rank raises it together (a save that failed, a bad checkpoint, a run
        # directory another run holds): rank 0 says it, the others leave a little later
        # (as above).
        if int(os.environ.get("RANK", "0")) == 0:
            return error("train", e)
        time.sleep(3)
        return 2
    except DataError as e:  # the rank that read it says so; torchrun stops the others
        return error("train", e)
    except OSError as e:  # writing the run directory (metrics, TensorBoard, eval files)
        from dlrm.utils.files import io_fault

        # A failed write to an open file names none: then the run directory is named.
        return error("train", OSError(io_fault(e, Path(args.run_dir or "."))))
    return 0


def _plan(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.config import load_config
    from dlrm.errors import ConfigError

    try:
        config = load_config(args.config, rest)
        if args.hbm_gib is not None:
            config.sharding.hbm_gib = args.hbm_gib
        if args.ddr_gib is not None:
            config.sharding.ddr_gib = args.ddr_gib
        from dlrm.train.preflight import plan_inputs

        features, sizes, evictions = plan_inputs(config)
    except (ConfigError, ValueError) as e:
        return error("plan", e)
    import torch
    from torchrec.distributed.planner.types import PlannerError

    from dlrm.train.model import build_model, table_name
    from dlrm.train.optim import apply_embedding_optimizer
    from dlrm.train.sharding import Planner, plan_offline

    meta = torch.device("meta")
    model = build_model(config.model, features, sizes, meta, meta, evictions=evictions,
                        buckets=args.world_size)
    apply_embedding_optimizer(model, config.optim)
    spec = Planner(config.sharding, args.world_size, args.local_world_size or args.world_size,
                   args.device, config.data.batch_size)
    try:
        text, memory = plan_offline(model, [table_name(f) for f in features.sparse], spec,
                                    managed=bool(evictions))
    except PlannerError as e:
        print(f"dlrm plan: no plan fits {args.world_size} x {args.device} "
              f"(HBM {spec.hbm_bytes() / 2**30:.0f} GiB, DDR {spec.ddr_bytes() / 2**30:.0f} "
              f"GiB per rank): {e}", file=sys.stderr)
        return 1
    print(text, end="")
    print(json.dumps({"event": "plan", "world_size": args.world_size, "device": args.device,
                      "memory_per_rank": memory}))
    return 0


def _evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.train.offline import default_split, evaluate_checkpoint, format_metrics

    try:
        args.split = args.split or default_split(args.data)
        if args.ranking:
            return _ranking(args)
        report = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.out,
                                     args.batch_size)
    except offline_errors() as e:
        return error("evaluate", e)
    if report is not None:  # rank 0
        print(f"{report['checkpoint']} (step {report['step']}) on {args.data} "
              f"split {args.split}, {report['world_size']} rank(s):")
        print(format_metrics(report["metrics"]))
        print(json.dumps({"event": "evaluate", "split": args.split, **report["metrics"]}))
    return 0


def _ranking(args: argparse.Namespace) -> int:
    from dlrm.serve.ranking import rank_checkpoint
    from dlrm.train.offline import format_metrics

    if min(args.k) < 1 or args.ranking_candidates < 0:
        raise ValueError("--k must be positive and --ranking-candidates >= 0")
    report = rank_checkpoint(args.checkpoint, args.data, args.split, tuple(args.k),
                             args.ranking_candidates, args.ranking_seed, args.relevant,
                             args.out, args.batch_size)
    if report is not None:  # rank 0
        print(f"{report['checkpoint']} (step {report['step']}) on {args.data} split "
              f"{args.split}: ranking {report['protocol']}; relevant: {report['relevant']}")
        print(format_metrics(report["metrics"]))
        print(json.dumps({"event": "ranking", "split": args.split,
                          "protocol": report["protocol"], **report["metrics"]}))
    return 0


def _score(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.train.offline import default_split, score_checkpoint

    try:
        args.split = args.split or default_split(args.data)
        rows = score_checkpoint(args.checkpoint, args.data, args.out, args.split,
                                args.batch_size)
    except offline_errors() as e:
        return error("score", e)
    if rows is not None:
        print(json.dumps({"event": "score", "split": args.split, "rows": rows,
                          "out": args.out}))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Adds these commands to the ``dlrm`` parser."""
    p = sub.add_parser("train", help="train (one rank; under torchrun one of N)",
                       epilog="Any config key can be overridden: --section.key=value")
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="same as --train.resume: auto (default) goes on from the newest "
                        "complete checkpoint in the run directory")
    p.add_argument("--init-from", default=None, metavar="CK",
                   help="same as --train.init_from: a new run warm-started from another "
                        "run's checkpoint (tables, dense part, optimizer state)")
    p.add_argument("--init-from-weights-only", action="store_true",
                   help="same as --train.init_from_weights_only: the optimizer starts fresh")
    p.add_argument("--nproc-per-node", type=int, default=0, metavar="N",
                   help="check the config, then start N ranks on this host with torchrun "
                        "(torchrun --standalone --nproc_per_node N -m dlrm train ...)")
    p.set_defaults(func=_train)

    p = sub.add_parser("plan", help="sharding plan and memory per rank for a cluster that "
                                    "need not exist",
                       epilog="Any config key can be overridden: --section.key=value")
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--local-world-size", type=int, default=0,
                   help="ranks per host (default: all on one host)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hbm-gib", type=float, default=None, help="GPU memory per rank")
    p.add_argument("--ddr-gib", type=float, default=None, help="host memory per rank")
    p.set_defaults(func=_plan)

    for name, func, text in [("evaluate", _evaluate, "offline metrics of a checkpoint on a "
                              "dataset split (alone or under torchrun, any rank count)"),
                             ("score", _score, "batch scoring of a split to Parquet "
                              "(row, label, prob)")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step-N")
        p.add_argument("--data", required=True, help="dataset written by dlrm preprocess")
        p.add_argument("--split", choices=["train", "val", "test", "all"], default=None,
                       help="the run's split of this dataset, or all of its rows (default: "
                            "test; all for a dataset made with preprocess --like)")
        p.add_argument("--out", required=name == "score",
                       help="JSON report (evaluate) / Parquet file (score)")
        p.add_argument("--batch-size", type=int, default=0,
                       help="per rank (default: the run's eval batch size)")
        if name == "evaluate":
            p.add_argument("--ranking", action="store_true",
                           help="schemas with [roles]: recall@K and NDCG@K of ranking items "
                                "for each user of the split (written to "
                                "RUN/eval/ranking-SPLIT.json unless --out)")
            p.add_argument("--k", type=int, nargs="+", default=[10, 20], metavar="K",
                           help="--ranking: the cut-offs (default 10 20)")
            p.add_argument("--ranking-candidates", type=int, default=0, metavar="N",
                           help="--ranking: rank each user's relevant items among N items "
                                "sampled from the rest (default 0: among every item of the "
                                "training rows)")
            p.add_argument("--ranking-seed", type=int, default=0,
                           help="--ranking: seed of the sampled candidates")
            p.add_argument("--relevant", type=float, default=None,
                           help="--ranking: a row is relevant if its label is at least this "
                                "(default: 1 for a click, 4 for a rating)")
        p.set_defaults(func=func)
