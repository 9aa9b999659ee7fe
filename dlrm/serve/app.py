"""An exported model behind HTTP (``dlrm serve``): Starlette on uvicorn.

- ``POST /predict`` ``{"rows": [...]}``: rows as objects keyed by column name or lists in
  the input's column order (``dlrm.serve.request_rows``) → ``{"predictions": [...]}``, click
  probabilities (a regression label: predicted values), one per row, in order.
- ``POST /recommend``: see ``dlrm.serve.recommend``.
- ``POST /admin/reload`` ``{"model": "DIR"}`` (or SIGHUP: the directory the server started
  with): see ``dlrm.serve.served``; 200 with the new version, 409 for a model that answers
  other requests, 422 for one that cannot be loaded.
- ``GET /health`` (alive); ``GET /ready`` (200 once the model is loaded and warm, 503
  before); ``GET /metadata``: the schema, the table precision, the checkpoint and the
  model's version; ``GET /metrics``: Prometheus' text format (``dlrm.serve.telemetry``).

Scoring is micro-batched (``dlrm.serve.batcher``): the rows of requests that wait while
a batch is scored are converted and scored together, a few rows on the event loop, more on
the model thread. A request that
cannot be read gets a 4xx whose ``error`` names what is wrong (400: not JSON; 413: a body
over the limit; 422: rows that cannot be scored, by row and field); 503 with
``Retry-After`` when the queue is full, 504 past the request timeout; an unexpected failure
is a 500 for that request only. Once the model is warm, the objects alive are frozen out of
the garbage collector's sweeps (``gc.freeze``: a full sweep of a loaded model's objects
takes 170 ms, a stall every request in flight would wait out). uvicorn's SIGTERM handling
stops accepting, lets the requests in flight finish, then exits (0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
from typing import Any, Protocol

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dlrm.serve.batcher import Batcher, Overloaded
from dlrm.serve.body import BadRequest, read_json
from dlrm.serve.model_dir import Exported, load_exported
from dlrm.serve.policy import DEFAULT_POLICY, Policy
from dlrm.serve.reload import Reloader
from dlrm.serve.request_rows import RowsError
from dlrm.serve.served import Served
from dlrm.serve.telemetry import Instrumented, Telemetry

MAX_BODY_BYTES = 1 << 20
# The model thread's intra-op threads: one, so that the event loop keeps the other core.
SCORING_THREADS = 1


class Reloads(Protocol):
    """Who carries out a reload: the process itself (``Reloader.reload``), or the
    supervisor of ``--workers N`` on every worker (``workers.Link.reload``)."""

    async def reload(self, path: str) -> dict[str, Any]: ...


def create_app(exported: Exported, max_body_bytes: int = MAX_BODY_BYTES,
               policy: Policy = DEFAULT_POLICY, access_log: bool | None = None,
               link: Any = None) -> Starlette:
    """The app; ``link``: this worker's end of the ``--workers`` supervisor's pipe
    (``workers.Link``), None for a server of one process."""
    first = Served.of(exported)
    telemetry = Telemetry()
    batcher = Batcher(first, policy, telemetry.batch_rows.observe, telemetry.queue_depth.set)
    state = {"ready": False}
    counts = {"predict": 0, "recommend": 0, "refused": 0}  # every request, answered or not

    def labels(served: Served) -> dict[str, str]:
        info = served.exported.info
        return {"version": served.version, "checkpoint": str(info["checkpoint"]),
                "step": str(info["step"])}

    telemetry.serving(labels(first), None)
    reloader = Reloader(batcher, lambda old, new: telemetry.serving(labels(new), labels(old)))
    reloads: Reloads = reloader if link is None else link

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
        served = batcher.model
        if served.recommender is None:
            raise BadRequest(404, f"schema {served.rows.schema.name} names no item features: "
                                  "nothing to recommend")
        if not isinstance(body, dict) or "user" not in body:
            raise BadRequest(400, 'body: expected an object with "user"')
        unknown = sorted(set(body) - {"user", "top_k", "candidates", "exclude"})
        if unknown:
            raise BadRequest(422, f"body: unknown field(s) {', '.join(unknown)}")
        try:
            items = await run_in_threadpool(
                served.recommender.recommend, body["user"], body.get("top_k", 10),
                body.get("candidates"), body.get("exclude", []))
        except RowsError as e:
            raise BadRequest(422, str(e)) from None
        return JSONResponse({"items": items})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "pid": os.getpid(),  # of this worker, alone
                             "version": batcher.model.version,
                             "requests": counts["predict"] + counts["recommend"],
                             **{f"{k}_requests": v for k, v in counts.items()},
                             "batches": batcher.batches, "scored_requests": batcher.requests})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": state["ready"], "version": batcher.model.version},
                            status_code=200 if state["ready"] else 503)

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(batcher.model.metadata)

    async def metrics(request: Request) -> Response:
        return Response(telemetry.render(), media_type=telemetry.content_type)

    async def admin_reload(request: Request) -> JSONResponse:
        body = await read_json(request, max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise BadRequest(400, 'body: expected an object with "model": a model directory')
        return JSONResponse(await reloads.reload(body["model"]))

    async def sighup() -> None:
        try:
            print(json.dumps(await reloads.reload(str(exported.path))), flush=True)
        except BadRequest as e:
            print(json.dumps({"event": "reload_refused", "error": str(e)}), flush=True)

    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BadRequest)
        counts["refused"] += 1
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    async def warm() -> None:
        """A row of missing values through each path, then through the batcher; then
        /ready says so."""
        await asyncio.get_running_loop().run_in_executor(batcher.model_thread,
                                                         batcher.warm, first)
        await batcher.score([dict.fromkeys(first.rows.required)])
        gc.freeze()
        state["ready"] = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(warm())]
        if link is not None:  # a worker: its supervisor takes SIGHUP
            link.attach(reloader)
        else:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # none off main
                loop.add_signal_handler(signal.SIGHUP, lambda: tasks.append(
                    asyncio.create_task(sighup())))
        yield
        for task in tasks:
            task.cancel()
        batcher.model_thread.shutdown()

    routes = [Route("/predict", predict, methods=["POST"]),
              Route("/recommend", recommend, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/ready", ready, methods=["GET"]),
              Route("/metadata", meta, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/admin/reload", admin_reload, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={BadRequest: bad_request},
                    middleware=[Middleware(Instrumented, telemetry=telemetry,
                                           endpoints=frozenset(r.path for r in routes),
                                           access_log=access_log)])
    app.state.batcher = batcher
    return app


def _number(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = MAX_BODY_BYTES, policy: Policy = DEFAULT_POLICY) -> None:
    """Serves until SIGTERM or SIGINT (requests in flight finish first)."""
    app = create_app(load_exported(model), max_body_bytes, policy)
    print(json.dumps({"event": "serve", "model": model, "url": f"http://{host}:{port}",
                      "workers": 1, **dataclasses.asdict(policy)}), flush=True)
    run_server(app, host=host, port=port)
    print(json.dumps({"event": "serve_stopped", "batches": app.state.batcher.batches,
                      "requests": app.state.batcher.requests}), flush=True)


def run_server(app: Starlette, **where: Any) -> None:
    """uvicorn on ``host`` and ``port``, or on ``sockets`` (a worker's), until SIGTERM or
    SIGINT."""
    import uvicorn

    torch.set_num_threads(SCORING_THREADS)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again for
    # the handler it found: a server that finished its requests exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    sockets = where.pop("sockets", None)
    # uvloop and httptools (uvicorn[standard]) where installed: "auto" takes them.
    config = uvicorn.Config(app, **where, log_level="warning", access_log=False, loop="auto",
                            http="auto")
    uvicorn.Server(config).run(sockets=sockets)
