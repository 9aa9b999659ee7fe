"""``dlrm synth``, ``dlrm preprocess``, ``dlrm verify``: making and checking datasets."""

from __future__ import annotations

import argparse
import json
import sys

from dlrm.cli.common import error


def _synth(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.errors import SchemaError
    from dlrm.schema.declared import load_schema
    from dlrm.synth.criteo import synth
    from dlrm.synth.declared import synth_declared

    if not 0 <= args.drift <= 0.5:
        return error("synth", ValueError(f"--drift: a share of rows from 0 to 0.5 (as many "
                                          f"again take the day before's new ids), got "
                                          f"{args.drift}"))
    if not args.schema:  # the demo's generator (Criteo's layout, its own planted model)
        report = synth(args.out, days=args.days, rows_per_day=args.rows_per_day,
                       seed=args.seed, gzip=args.gzip, growth=args.criteo_growth,
                       drift=args.drift)
    elif args.criteo_growth or args.drift:
        return error("synth", ValueError("--criteo-growth and --drift are for Criteo's "
                                          "layout; give no --schema"))
    else:  # the planted model of any schema, Criteo's named one included
        try:
            schema = load_schema(args.schema)
        except SchemaError as e:
            return error("synth", e)
        try:
            report = synth_declared(schema, args.out, days=args.days,
                                    rows_per_day=args.rows_per_day, seed=args.seed,
                                    max_vocab=args.max_vocab, gzip_files=args.gzip,
                                    signal=args.signal, interactions=args.interactions)
        except ValueError as e:
            return error("synth", e)
    print(json.dumps({"event": "synth", "out": args.out, **report["splits"]}))
    return 0


def _preprocess(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.errors import PreprocessError, SchemaError
    from dlrm.preprocess.driver import preprocess
    from dlrm.rows.chunks import Options
    from dlrm.rows.vocab import Encoding
    from dlrm.schema.declared import load_schema

    # The encoding flags, where given, replace the schema's encoding of every feature
    # (Encoding's defaults for the flags not given).
    given = {k: v for k, v in (("type", args.encoding), ("min_frequency", args.min_frequency),
                               ("max_vocab", args.max_vocab), ("buckets", args.buckets))
             if v is not None}
    encoding = Encoding(**given) if given else None
    options = Options(workers=args.workers, chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
                      max_line_bytes=args.max_line_bytes, stage=not args.no_stage,
                      memory_gib=args.memory_gib)
    try:
        # preprocess refuses a schema or an encoding given with --like.
        schema = (load_schema(args.schema) if args.schema
                  else None if args.like else load_schema("criteo"))
        preprocess(args.input, args.out, encoding=encoding, options=options, schema=schema,
                   like=args.like, vocab_from=args.vocab_from, grow=args.grow,
                   spark=(args.spark_master, args.spark_conf) if args.engine == "spark"
                   else None)
    except (PreprocessError, SchemaError) as e:
        return error("preprocess", e)
    return 0


def _verify(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.data.verify import verify_dataset
    from dlrm.errors import PreprocessError
    from dlrm.schema.manifest import load_manifest

    try:
        report = verify_dataset(args.dataset, load_manifest(args.dataset),
                                lambda m: print(m, file=sys.stderr))
    except PreprocessError as e:
        return error("verify", e)
    print(json.dumps({"event": "verify", "dataset": args.dataset, "files": report["files"],
                      "rows": report["rows"], "bad_files": len(report["bad"])}))
    if report["bad"]:
        print(f"dlrm verify: {len(report['bad'])} of {report['files']} files of "
              f"{args.dataset} are bad (listed above)", file=sys.stderr)
        return 2
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Adds these commands to the ``dlrm`` parser."""
    p = sub.add_parser("synth", help="write synthetic day files (Criteo's or a schema's "
                       "layout) with a planted click model")
    p.add_argument("--out", required=True)
    p.add_argument("--schema", default=None,
                   help="schema file or name in configs/schemas/ (default: Criteo's layout)")
    p.add_argument("--max-vocab", type=int, default=100_000,
                   help="schema: the largest vocabulary of a categorical feature")
    p.add_argument("--signal", choices=["high", "low", "even"], default="high",
                   help="schema: which vocabularies carry the click signal (high: the "
                   "largest, as real logs' user, ad and device ids)")
    p.add_argument("--interactions", type=float, default=0.5,
                   help="schema: strength of the planted pairwise interactions")
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--rows-per-day", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true", help="write day_N.gz")
    p.add_argument("--criteo-growth", action="store_true",
                   help="distinct values grow with the rows as Criteo's do (sublinearly, "
                        "the largest features fastest) instead of saturating at 100k")
    p.add_argument("--drift", type=float, default=0.0, metavar="RATE",
                   help="a log that changes daily: a RATE share of rows takes ids new that "
                        "day (as many the day before's), and effects take a random walk")
    p.set_defaults(func=_synth)

    p = sub.add_parser("preprocess", help="click logs (TSV/CSV, .gz) -> Parquet dataset + "
                       "manifest.json")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--schema", default=None,
                   help="schema file, or a name in configs/schemas/ (default: criteo)")
    p.add_argument("--like", default=None, metavar="DATASET",
                   help="encode the inputs as DATASET was: its schema, vocabularies (an "
                        "unseen value -> OOV id), hash buckets and dense statistics, so that "
                        "a model trained on DATASET scores them")
    p.add_argument("--grow", action="store_true",
                   help="with --like: extend DATASET's vocabularies by the values the new "
                        "files' training rows (--vocab-from) hold min_frequency times; old "
                        "ids never move, new ones follow them (train --init-from grows "
                        "the tables)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--engine", choices=["local", "spark"], default="local",
                   help="local: this host's processes; spark: each chunk a Spark task, the "
                        "counts summed by Spark's shuffle (the same dataset; not yet "
                        "--like, --grow, --memory-gib)")
    p.add_argument("--spark-master", default="local[*]", metavar="URL",
                   help="--engine spark: the master (local[N], spark://HOST:7077, yarn, "
                        "k8s://...)")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="--engine spark: a Spark setting (repeatable)")
    p.add_argument("--encoding", choices=["vocab", "hash"], default=None,
                   help="every feature's encoding (default: the schema's; criteo: vocab)")
    p.add_argument("--min-frequency", type=int, default=None,
                   help="vocab: rarer values -> OOV id (default 1)")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="vocab: cap per feature (default 0: none)")
    p.add_argument("--buckets", type=int, default=None,
                   help="hash: ids per feature (default 40M)")
    p.add_argument("--chunk-mb", type=float, default=256,
                   help="plain files are cut into chunks of this many MiB, the unit of "
                        "parallel work and of resumption")
    p.add_argument("--max-line-bytes", type=int, default=64 << 10,
                   help="longer lines are rejected as line_too_long")
    p.add_argument("--no-stage", action="store_true",
                   help="vocab: parse the inputs twice instead of staging the parsed rows "
                        "on disk (chosen anyway when the disk has no room for them)")
    p.add_argument("--memory-gib", type=float, default=0,
                   help="vocab: memory budget of counting and merging the values, shared "
                        "by the workers (default: a quarter of the host's memory); the "
                        "vocabularies do not depend on it")
    p.add_argument("--vocab-from", nargs="+", metavar="SPEC",
                   help="vocab: count the values of these rows only, named as the config's "
                        "split sources (day_0, *[0:0.8], 2014-10-21[0:0.5]); every other "
                        "value is out of vocabulary (default: the default split's training "
                        "rows: every source or period but the last, or the first 6/7 of a "
                        "single one). Training refuses val or test rows counted here")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("verify", help="check every shard of a dataset against its manifest: "
                       "present, its size, its page checksums, its rows, its ids")
    p.add_argument("dataset")
    p.set_defaults(func=_verify)
