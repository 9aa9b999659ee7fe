"""``dlrm`` command line: parse, load config, call one function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn


def _error(command: str, e: Exception) -> int:
    """The one way a command reports bad input: a line naming what is wrong, exit 2."""
    print(f"dlrm {command}: error: {e}", file=sys.stderr)
    return 2


def _synth(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.errors import SchemaError
    from dlrm.schema.declared import load_schema
    from dlrm.synth.criteo import synth
    from dlrm.synth.declared import synth_declared

    if not args.schema:  # the demo's generator (Criteo's layout, its own planted model)
        report = synth(args.out, days=args.days, rows_per_day=args.rows_per_day,
                       seed=args.seed, gzip=args.gzip, growth=args.criteo_growth)
    elif args.criteo_growth:
        return _error("synth", ValueError("--criteo-growth is for Criteo's layout; "
                                          "give no --schema"))
    else:  # the planted model of any schema, Criteo's named one included
        try:
            schema = load_schema(args.schema)
        except SchemaError as e:
            return _error("synth", e)
        try:
            report = synth_declared(schema, args.out, days=args.days,
                                    rows_per_day=args.rows_per_day, seed=args.seed,
                                    max_vocab=args.max_vocab, gzip_files=args.gzip,
                                    signal=args.signal, interactions=args.interactions)
        except ValueError as e:
            return _error("synth", e)
    print(json.dumps({"event": "synth", "out": args.out, **report["splits"]}))
    return 0


def _preprocess(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.errors import PreprocessError, SchemaError
    from dlrm.preprocess.driver import Encoding, Options, preprocess
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
                   like=args.like, vocab_from=args.vocab_from)
    except (PreprocessError, SchemaError) as e:
        return _error("preprocess", e)
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.config import load_config
    from dlrm.errors import ConfigError

    try:
        overrides = rest + ([f"--train.resume={args.resume}"] if args.resume else [])
        config = load_config(args.config, overrides)
        from dlrm.train.preflight import preflight

        preflight(config)  # before any process group starts
    except (ConfigError, ValueError) as e:
        # Under torchrun every rank finds the same error: rank 0 says it. The others leave
        # a little later, so that torchrun, which stops every rank at the first one to
        # fail, does not stop rank 0 before it has.
        if int(os.environ.get("RANK", "0")) == 0:
            return _error("train", e)
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
            return _error("train", e)
        time.sleep(3)
        return 2
    except DataError as e:  # the rank that read it says so; torchrun stops the others
        return _error("train", e)
    except OSError as e:  # writing the run directory (metrics, TensorBoard, eval files)
        from dlrm.utils.files import io_fault

        # A failed write to an open file names none: then the run directory is named.
        return _error("train", OSError(io_fault(e, Path(args.run_dir or "."))))
    return 0


def _verify(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.data.verify import verify_dataset
    from dlrm.errors import PreprocessError
    from dlrm.schema.manifest import load_manifest

    try:
        report = verify_dataset(args.dataset, load_manifest(args.dataset),
                                lambda m: print(m, file=sys.stderr))
    except PreprocessError as e:
        return _error("verify", e)
    print(json.dumps({"event": "verify", "dataset": args.dataset, "files": report["files"],
                      "rows": report["rows"], "bad_files": len(report["bad"])}))
    if report["bad"]:
        print(f"dlrm verify: {len(report['bad'])} of {report['files']} files of "
              f"{args.dataset} are bad (listed above)", file=sys.stderr)
        return 2
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

        features, sizes = plan_inputs(config)
    except (ConfigError, ValueError) as e:
        return _error("plan", e)
    import torch
    from torchrec.distributed.planner.types import PlannerError

    from dlrm.train.model import build_model, table_name
    from dlrm.train.optim import apply_embedding_optimizer
    from dlrm.train.sharding import Planner, plan_offline

    meta = torch.device("meta")
    model = build_model(config.model, features, sizes, meta, meta)
    apply_embedding_optimizer(model, config.optim)
    spec = Planner(config.sharding, args.world_size, args.local_world_size or args.world_size,
                   args.device, config.data.batch_size)
    try:
        text, memory = plan_offline(model, [table_name(f) for f in features.sparse], spec)
    except PlannerError as e:
        print(f"dlrm plan: no plan fits {args.world_size} x {args.device} "
              f"(HBM {spec.hbm_bytes() / 2**30:.0f} GiB, DDR {spec.ddr_bytes() / 2**30:.0f} "
              f"GiB per rank): {e}", file=sys.stderr)
        return 1
    print(text, end="")
    print(json.dumps({"event": "plan", "world_size": args.world_size, "device": args.device,
                      "memory_per_rank": memory}))
    return 0


def _offline_errors():
    from dlrm.errors import CheckpointError, ConfigError, PreprocessError

    return (CheckpointError, ConfigError, PreprocessError, ValueError)  # ExportError too


def _evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.train.offline import default_split, evaluate_checkpoint, format_metrics

    try:
        args.split = args.split or default_split(args.data)
        if args.ranking:
            return _ranking(args)
        report = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.out,
                                     args.batch_size)
    except _offline_errors() as e:
        return _error("evaluate", e)
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
    except _offline_errors() as e:
        return _error("score", e)
    if rows is not None:
        print(json.dumps({"event": "score", "split": args.split, "rows": rows,
                          "out": args.out}))
    return 0


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.serve.export import export

    try:
        info = export(args.checkpoint, args.out, args.tables, clip=not args.no_clip)
    except _offline_errors() as e:
        return _error("export", e)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(json.dumps({"event": "export", "out": args.out, "tables": info["tables"],
                      "step": info["step"], "bytes": size}))
    return 0


def _predict(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.rows.chunks import Options
    from dlrm.serve.predict import predict

    options = Options(workers=args.workers, chunk_bytes=max(1, int(args.chunk_mb * 2**20)))
    try:
        summary = predict(args.model, args.input, args.out, options=options)
    except _offline_errors() as e:
        return _error("predict", e)
    print(json.dumps(summary))
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.serve.app import serve

    try:
        serve(args.model, args.host, args.port, int(args.max_body_mb * 2**20))
    except _offline_errors() as e:
        return _error("serve", e)
    return 0


def _recommend(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.rows.like import schema_of
    from dlrm.serve.model_dir import load_exported
    from dlrm.serve.predict import Scorer, layout_for
    from dlrm.serve.recommend import Recommender, candidate_rows, load_lines
    from dlrm.serve.request_rows import RequestRows

    try:
        user = json.loads(args.user)
        exported = load_exported(args.model)
        scorer = Scorer(exported, layout_for(exported, None))
        recommender = Recommender(scorer, RequestRows(schema_of(exported.manifest)))
        items = recommender.recommend(
            user, args.top_k, candidate_rows(args.candidates) if args.candidates else None,
            load_lines(args.exclude) if args.exclude else [])
    except (OSError, *_offline_errors()) as e:  # a bad --user is a JSON (Value)Error
        return _error("recommend", e)
    print(json.dumps({"event": "recommend", "user": user, "items": items}))
    return 0


def _report(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        if len(args.run_dir) == 1 and args.out is None:
            from dlrm.experiments.report import report

            page = report(args.run_dir[0])
        else:
            from dlrm.experiments.compare import compare

            page = compare(args.run_dir, args.out)
    except ValueError as e:
        return _error("report", e)
    print(json.dumps({"event": "report", "page": str(page)}))
    return 0


def _sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.errors import ConfigError
    from dlrm.experiments.sweep import sweep

    try:
        sweep(args.config, args.space, args.trials, args.runs_dir, rest,
              nproc_per_node=args.nproc_per_node, seed=args.seed)
    except (ConfigError, ValueError) as e:
        return _error("sweep", e)
    return 0


def entry() -> NoReturn:
    """The ``dlrm`` command (and ``python -m dlrm``): :func:`main`, then an exit that skips
    tearing down native thread pools. A pyarrow or gloo thread still alive while the
    interpreter finalizes can abort a run that has finished ("terminate called without
    an active exception", apache/arrow#34314); every file a command writes is closed (and
    renamed into place) before ``main`` returns, so nothing is lost by leaving at once."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlrm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
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

    p = sub.add_parser("train", help="train (one rank; under torchrun one of N)",
                       epilog="Any config key can be overridden: --section.key=value")
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="same as --train.resume: auto (default) goes on from the newest "
                        "complete checkpoint in the run directory")
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

    p = sub.add_parser("export", help="a checkpoint -> a model directory that scores raw "
                       "rows on its own (schema, vocabularies, unsharded model)")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step-N")
    p.add_argument("--out", required=True, help="the model directory (new or empty)")
    p.add_argument("--tables", choices=["fp32", "fp16", "int8", "int4"], default="fp32",
                   help="precision of the embedding tables (TorchRec's quantized "
                        "EmbeddingBagCollection below fp32); the MLPs stay fp32")
    p.add_argument("--no-clip", action="store_true",
                   help="regression: predictions as the model makes them, instead of kept "
                        "within the smallest and largest label of the training rows")
    p.set_defaults(func=_export)

    def model_command(name: str, func, text: str) -> argparse.ArgumentParser:
        """A command of an exported model (``--model MODEL``)."""
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="directory written by dlrm export")
        p.set_defaults(func=func)
        return p

    p = model_command("predict", _predict, "score raw files (the model's schema) with an "
                      "exported model -> Parquet source, line, prob, label")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--out", required=True, help="Parquet file; rejects go to OUT.rejects.tsv")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--chunk-mb", type=float, default=64,
                   help="plain files are scored in chunks of this many MiB")

    p = model_command("serve", _serve, "an exported model over HTTP JSON: POST /predict, "
                      "POST /recommend, GET /health, GET /metadata")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=1.0,
                   help="larger request bodies get 413")

    p = model_command("recommend", _recommend, "top-K items for a user with an exported "
                      "model (a schema whose [roles] name user and item features)")
    p.add_argument("--user", required=True, help='JSON object of user features, e.g. '
                   '\'{"user_id": 13, "gender": "M"}\'')
    p.add_argument("--candidates", default=None, help="CSV with a header of item rows "
                   "(default: every distinct item of the training data)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--exclude", default=None, help="file of item keys to leave out (one "
                   "per line), e.g. those the user has seen")

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

    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "plan", "sweep"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)
