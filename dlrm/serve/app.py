"""An exported model behind HTTP (``dlrm serve``): Starlette on uvicorn.

- ``POST /predict`` ``{"rows": [...]}``: rows as objects keyed by column name or lists in
  the input's column order (``dlrm.serve.request_rows``) → ``{"predictions": [...]}``, click
  probabilities (a regression label: predicted values), one per row, in order.
- ``POST /recommend``: see ``dlrm.serve.recommend``.
- ``GET /health`` (alive); ``GET /ready`` (200 once the model is loaded and warm, 503
  before); ``GET /metadata``: the schema, the table precision, the checkpoint and the
  model's version; ``GET /metrics``: Prometheus' text format (``dlrm.serve.telemetry``).

Scoring is micro-batched (``dlrm.serve.batcher``): the rows of requests that wait while
the model is busy are converted and scored together, on one model thread. A request that
cannot be read gets a 4xx whose ``error`` names what is wrong (400: not JSON; 413: a body
over the limit; 422: rows that cannot be scored, by row and field); 503 with
``Retry-After`` when the queue is full, 504 past the request timeout; an unexpected failure
is a 500 for that request only. uvicorn's SIGTERM handling stops accepting, lets the
requests in flight finish, then exits (0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import signal

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dlrm.rows.like import schema_of
from dlrm.serve.batcher import DEFAULT_POLICY, Batcher, Overloaded, Policy
from dlrm.serve.body import BadRequest, read_json
from dlrm.serve.model_dir import MODEL_JSON, Exported, load_exported
from dlrm.serve.predict import Scorer, layout_for
from dlrm.serve.recommend import Recommender
from dlrm.serve.request_rows import RequestRows, RowsError
from dlrm.serve.telemetry import Instrumented, Telemetry

MAX_BODY_BYTES = 1 << 20
# The model thread's intra-op threads: one, so that the event loop keeps the other core.
SCORING_THREADS = 1


def create_app(exported: Exported, max_body_bytes: int = MAX_BODY_BYTES,
               policy: Policy = DEFAULT_POLICY, access_log: bool | None = None) -> Starlette:
    schema = schema_of(exported.manifest)
    layout = layout_for(exported, None)
    rows = RequestRows(schema)
    scorer = Scorer(exported, layout)
    holder: dict[str, Batcher] = {}
    telemetry = Telemetry(lambda: holder["batcher"].queue.qsize() if holder else 0)
    batcher = Batcher(scorer, rows, policy, telemetry.batch_rows.observe)
    holder["batcher"] = batcher
    recommender = Recommender(scorer, rows) if schema.item else None
    info = exported.info
    version = model_version(exported)
    telemetry.serving({"version": version, "checkpoint": str(info["checkpoint"]),
                       "step": str(info["step"])})
    metadata = {"schema": schema.to_json(), "tables": info["tables"],
                "checkpoint": info["checkpoint"], "step": info["step"],
                "trained_on": info["trained_on"], "label_kind": schema.kind,
                "columns": rows.columns, "required": rows.required, "version": version}
    state = {"ready": False}
    counts = {"predict": 0, "recommend": 0, "refused": 0}  # every request, answered or not

    async def predict(request: Request) -> Response:
        counts["predict"] += 1
        body = await read_json(request, max_body_bytes)
        if not isinstance(body, dict) or "rows" not in body:
            raise BadRequest(400, 'body: expected an object with "rows"')
        try:
            outputs = await batcher.score(body["rows"])
        except RowsError as e:
            raise BadRequest(422, str(e)) from None
        except Overloaded as e:
            raise BadRequest(503, f"overloaded: {e}; retry later") from None
        except TimeoutError:
            raise BadRequest(504, f"not scored within {policy.timeout_s:g} s") from None
        return Response(json.dumps({"predictions": [_number(x) for x in outputs.tolist()]}),
                        media_type="application/json")

    async def recommend(request: Request) -> JSONResponse:
        counts["recommend"] += 1
        body = await read_json(request, max_body_bytes)
        if recommender is None:
            raise BadRequest(404, f"schema {schema.name} names no item features: nothing "
                                  "to recommend")
        if not isinstance(body, dict) or "user" not in body:
            raise BadRequest(400, 'body: expected an object with "user"')
        unknown = sorted(set(body) - {"user", "top_k", "candidates", "exclude"})
        if unknown:
            raise BadRequest(422, f"body: unknown field(s) {', '.join(unknown)}")
        try:
            items = await run_in_threadpool(
                recommender.recommend, body["user"], body.get("top_k", 10),
                body.get("candidates"), body.get("exclude", []))
        except RowsError as e:
            raise BadRequest(422, str(e)) from None
        return JSONResponse({"items": items})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "requests": counts["predict"] + counts["recommend"],
                             **{f"{k}_requests": v for k, v in counts.items()},
                             "batches": batcher.batches, "scored_requests": batcher.requests})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": state["ready"], "version": version},
                            status_code=200 if state["ready"] else 503)

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(metadata)

    async def metrics(request: Request) -> Response:
        return Response(telemetry.render(), media_type=telemetry.content_type)

    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BadRequest)
        counts["refused"] += 1
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    async def warm() -> None:
        """One row of missing values through the whole path; then /ready says so."""
        await batcher.score([dict.fromkeys(rows.required)])
        state["ready"] = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(warm())]
        yield
        for task in tasks:
            task.cancel()
        batcher.model_thread.shutdown()

    routes = [Route("/predict", predict, methods=["POST"]),
              Route("/recommend", recommend, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/ready", ready, methods=["GET"]),
              Route("/metadata", meta, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={BadRequest: bad_request},
                    middleware=[Middleware(Instrumented, telemetry=telemetry,
                                           access_log=access_log)])
    app.state.batcher, app.state.rows = batcher, rows
    return app


def model_version(exported: Exported) -> str:
    """A model directory's version: the first 12 hex digits of its model.json's sha256 (it
    names the checkpoint, the step and every file's checksum)."""
    return hashlib.sha256((exported.path / MODEL_JSON).read_bytes()).hexdigest()[:12]


def _number(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = MAX_BODY_BYTES, policy: Policy = DEFAULT_POLICY) -> None:
    """Serves until SIGTERM or SIGINT (requests in flight finish first)."""
    import uvicorn

    torch.set_num_threads(SCORING_THREADS)
    app = create_app(load_exported(model), max_body_bytes, policy)
    print(json.dumps({"event": "serve", "model": model, "url": f"http://{host}:{port}",
                      **dataclasses.asdict(policy)}), flush=True)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again for
    # the handler it found: a server that finished its requests exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # uvloop and httptools (uvicorn[standard]) where installed: "auto" takes them.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                loop="auto", http="auto")
    print(json.dumps({"event": "serve_stopped", "batches": app.state.batcher.batches,
                      "requests": app.state.batcher.requests}), flush=True)
