"""``dlrm report``, ``dlrm sweep``: runs compared and searched."""

from __future__ import annotations

import argparse
import json

from dlrm.cli.common import error


def _report(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        if len(args.run_dir) == 1 and args.out is None:
            from dlrm.experiments.report import report

            page = report(args.run_dir[0])
        else:
            from dlrm.experiments.compare import compare

            page = compare(args.run_dir, args.out)
    except ValueError as e:
        return error("report", e)
    print(json.dumps({"event": "report", "page": str(page)}))
    return 0


def _sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.errors import ConfigError
    from dlrm.experiments.sweep import sweep

    try:
        sweep(args.config, args.space, args.trials, args.runs_dir, rest,
              nproc_per_node=args.nproc_per_node, seed=args.seed)
    except (ConfigError, ValueError) as e:
        return error("sweep", e)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Adds these commands to the ``dlrm`` parser."""
    p = sub.add_parser("report", help="plots and a summary page of a run, or of several "
                       "runs overlaid")
    p.add_argument("run_dir", nargs="+")
    p.add_argument("--out", default=None, help="several runs: the page's directory "
                   "(default: their common parent's report/)")
    p.set_defaults(func=_report)

    p = sub.add_parser("sweep", help="Optuna search over config keys, a dlrm train run per "
                       "trial; resumable (any other --section.key=value overrides the recipe)")
    p.add_argument("--config", required=True, help="the recipe every trial starts from")
    p.add_argument("--space", required=True, help="TOML: a table per key, low/high or choices")
    p.add_argument("--trials", type=int, required=True, help="finished trials wanted")
    p.add_argument("--runs-dir", required=True, help="the study, its runs and its report")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per trial (torchrun)")
    p.add_argument("--seed", type=int, default=0, help="of Optuna's TPE sampler")
    p.set_defaults(func=_sweep)
