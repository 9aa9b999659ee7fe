"""``dlrm export``, ``dlrm predict``, ``dlrm serve``, ``dlrm recommend``: exported models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlrm.cli.common import error, offline_errors
from dlrm.serve.policy import DEFAULT_POLICY, Policy


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.serve.export import export

    try:
        info = export(args.checkpoint, args.out, args.tables, clip=not args.no_clip)
    except offline_errors() as e:
        return error("export", e)
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
    except offline_errors() as e:
        return error("predict", e)
    print(json.dumps(summary))
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    from dlrm.serve.workers import auto_workers, serve_workers  # no torch in the supervisor

    try:
        policy = Policy(args.max_batch_rows, args.max_wait_ms, args.max_queue, args.timeout_s)
        if args.workers == "auto":
            workers = auto_workers(args.model) if Path(args.model).is_dir() else 1
        elif args.workers.isdigit() and int(args.workers) >= 1:
            workers = int(args.workers)
        else:
            raise ValueError(f"--workers: expected auto or a number from 1, got "
                             f"{args.workers!r}")
        body = int(args.max_body_mb * 2**20)
        if workers > 1:
            return serve_workers(args.model, args.host, args.port, workers, body, policy)
        from dlrm.serve.app import serve

        serve(args.model, args.host, args.port, body, policy)
    except offline_errors() as e:
        return error("serve", e)
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
    except (OSError, *offline_errors()) as e:  # a bad --user is a JSON (Value)Error
        return error("recommend", e)
    print(json.dumps({"event": "recommend", "user": user, "items": items}))
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Adds these commands to the ``dlrm`` parser."""
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
    p.add_argument("--workers", default="auto",
                   help="server processes on the port, each with its own copy of the model "
                        "(a reload reaches all, /metrics sums them); auto: one per core, as "
                        "many as fit in half of the memory")
    p.add_argument("--max-body-mb", type=float, default=1.0,
                   help="larger request bodies get 413")
    p.add_argument("--max-batch-rows", type=int, default=DEFAULT_POLICY.max_batch_rows,
                   help="rows scored in one forward pass at most (a larger request is "
                        "scored alone)")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_POLICY.max_wait_ms,
                   help="how long the first waiting request may wait for others to join "
                        "its batch (default 0: a batch is what waits while the model is busy)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_POLICY.max_queue,
                   help="requests waiting to be scored at most; beyond, 503 with Retry-After")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_POLICY.timeout_s,
                   help="a request not scored within this many seconds gets 504 (0: none)")

    p = model_command("recommend", _recommend, "top-K items for a user with an exported "
                      "model (a schema whose [roles] name user and item features)")
    p.add_argument("--user", required=True, help='JSON object of user features, e.g. '
                   '\'{"user_id": 13, "gender": "M"}\'')
    p.add_argument("--candidates", default=None, help="CSV with a header of item rows "
                   "(default: every distinct item of the training data)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--exclude", default=None, help="file of item keys to leave out (one "
                   "per line), e.g. those the user has seen")
