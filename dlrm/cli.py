"""``dlrm`` command line: parse, load config, call one function."""

from __future__ import annotations

import argparse
import json
import sys


def _synth(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.data.synth import synth

    report = synth(args.out, days=args.days, rows_per_day=args.rows_per_day, seed=args.seed,
                   gzip=args.gzip)
    print(json.dumps({"event": "synth", "out": args.out, **report["splits"]}))
    return 0


def _preprocess(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.data.preprocess import Encoding, Options, PreprocessError, preprocess

    encoding = Encoding(type=args.encoding, min_frequency=args.min_frequency,
                        max_vocab=args.max_vocab, buckets=args.buckets)
    options = Options(workers=args.workers, chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
                      max_line_bytes=args.max_line_bytes)
    try:
        preprocess(args.input, args.out, encoding=encoding, options=options)
    except PreprocessError as e:
        print(f"dlrm preprocess: error: {e}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.config import ConfigError, load_config

    try:
        overrides = rest + ([f"--train.resume={args.resume}"] if args.resume else [])
        config = load_config(args.config, overrides)
        from dlrm.train import check_data, check_device

        check_data(config.data)  # before any process group starts
        check_device(config)
    except (ConfigError, ValueError) as e:
        print(f"dlrm train: error: {e}", file=sys.stderr)
        return 2
    from dlrm.checkpoint import CheckpointError
    from dlrm.train import train

    try:
        train(config, args.run_dir)
    except CheckpointError as e:
        print(f"dlrm train: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlrm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic Criteo-format day files")
    p.add_argument("--out", required=True)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--rows-per-day", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true", help="write day_N.gz")
    p.set_defaults(func=_synth)

    p = sub.add_parser("preprocess", help="Criteo TSV(.gz) -> Parquet dataset + manifest.json")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--encoding", choices=["vocab", "hash"], default="vocab")
    p.add_argument("--min-frequency", type=int, default=1, help="vocab: rarer values -> OOV id")
    p.add_argument("--max-vocab", type=int, default=0, help="vocab: cap per feature (0: none)")
    p.add_argument("--buckets", type=int, default=40_000_000, help="hash: ids per feature")
    p.add_argument("--chunk-mb", type=float, default=256,
                   help="plain files are cut into chunks of this many MiB, the unit of "
                        "parallel work and of resumption")
    p.add_argument("--max-line-bytes", type=int, default=64 << 10,
                   help="longer lines are rejected as line_too_long")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("train", help="train (one rank; under torchrun one of N)",
                       epilog="Any config key can be overridden: --section.key=value")
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="same as --train.resume: auto (default) goes on from the newest "
                        "complete checkpoint in the run directory")
    p.set_defaults(func=_train)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)
