"""An exported model behind HTTP (``dlrm serve``): Starlette on uvicorn.

- ``POST /predict`` ``{"rows": [...]}``: rows as objects keyed by column name or lists in
  the input's column order (``dlrm.serve.request_rows``) → ``{"predictions": [...]}``, click
  probabilities (a regression label: predicted values), one per row, in order.
- ``POST /recommend``: see ``dlrm.serve.recommend``.
- ``GET /health``; ``GET /metadata``: the schema, the table precision and the checkpoint.

Rows are parsed in the request's own thread; scoring is micro-batched: requests that
arrive while the model is busy are scored together in one forward pass (up to
``max_batch_rows``), on one model thread. A request that cannot be read gets a 4xx whose
``error`` names what is wrong (400: not JSON; 413: a body over the limit; 422: rows that
cannot be scored, by row and field); an unexpected failure is a 500 for that request
only. uvicorn's SIGTERM handling stops accepting, lets the requests in flight finish, then
exits (0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dlrm.rows.blocks import Block
from dlrm.rows.like import schema_of
from dlrm.serve.model_dir import Exported, load_exported
from dlrm.serve.predict import Scorer, layout_for
from dlrm.serve.recommend import Recommender
from dlrm.serve.request_rows import RequestRows, RowsError

MAX_BODY_BYTES = 1 << 20


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def concat_blocks(blocks: list[Block]) -> Block:
    """One block of all rows, in order (every per-row array concatenated)."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    return Block(np.concatenate([b.label for b in blocks]),
                 [np.concatenate([b.dense[j] for b in blocks]) for j in range(len(first.dense))],
                 [(np.concatenate([b.hex[f][0] for b in blocks]),
                   np.concatenate([b.hex[f][1] for b in blocks])) for f in range(len(first.hex))],
                 [], 0)


class Batcher:
    """Scores blocks submitted concurrently, several requests per forward pass."""

    def __init__(self, scorer: Scorer, max_rows: int) -> None:
        self.scorer, self.max_rows = scorer, max_rows
        self.queue: asyncio.Queue[tuple[Block, asyncio.Future]] = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batches = self.requests = 0

    async def score(self, block: Block) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((block, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            rows = waiting[0][0].label.size
            while rows < self.max_rows and not self.queue.empty():
                waiting.append(self.queue.get_nowait())
                rows += waiting[-1][0].label.size
            try:
                _, outputs = await loop.run_in_executor(
                    self.model_thread, self.scorer.score, concat_blocks([b for b, _ in waiting]))
            except Exception as e:  # a failure of this batch only
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(waiting)
            start = 0
            for block, future in waiting:
                n = block.label.size
                if not future.done():  # a client that went away leaves a cancelled one
                    future.set_result(outputs[start:start + n])
                start += n


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body; BadRequest 413 over ``limit`` bytes, 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"body is over the limit of {limit} bytes")
    try:
        return json.loads(bytes(body), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from None


def create_app(exported: Exported, max_body_bytes: int = MAX_BODY_BYTES,
               max_batch_rows: int = 4096) -> Starlette:
    schema = schema_of(exported.manifest)
    layout = layout_for(exported, None)
    rows = RequestRows(schema)
    scorer = Scorer(exported, layout)
    batcher = Batcher(scorer, max_batch_rows)
    recommender = Recommender(scorer, rows) if schema.item else None
    info = exported.info
    metadata = {"schema": schema.to_json(), "tables": info["tables"],
                "checkpoint": info["checkpoint"], "step": info["step"],
                "trained_on": info["trained_on"], "label_kind": schema.kind,
                "columns": rows.columns, "required": rows.required}

    async def rows_of(request: Request) -> Block:
        body = await read_json(request, max_body_bytes)
        if not isinstance(body, dict) or "rows" not in body:
            raise BadRequest(400, 'body: expected an object with "rows"')
        try:
            return await run_in_threadpool(rows.block, body["rows"])
        except RowsError as e:
            raise BadRequest(422, str(e)) from None

    counts = {"predict": 0, "recommend": 0, "refused": 0}  # every request, answered or not

    async def predict(request: Request) -> JSONResponse:
        counts["predict"] += 1
        block = await rows_of(request)
        outputs = await batcher.score(block)
        return JSONResponse({"predictions": [_number(x) for x in outputs]})

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

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(metadata)

    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BadRequest)
        counts["refused"] += 1
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.model_thread.shutdown()

    routes = [Route("/predict", predict, methods=["POST"]),
              Route("/recommend", recommend, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/metadata", meta, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={BadRequest: bad_request})
    app.state.batcher, app.state.rows = batcher, rows
    return app


def _number(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Serves until SIGTERM or SIGINT (requests in flight finish first)."""
    import uvicorn


    app = create_app(load_exported(model), max_body_bytes)
    print(json.dumps({"event": "serve", "model": model, "url": f"http://{host}:{port}"}),
          flush=True)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again for
    # the handler it found: a server that finished its requests exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    print(json.dumps({"event": "serve_stopped", "batches": app.state.batcher.batches,
                      "requests": app.state.batcher.requests}), flush=True)
