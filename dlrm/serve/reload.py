"""A model directory swapped in under a running server without dropping a request.

``prepare`` loads the directory beside the model serving, checks that it answers the same
requests (``Served.incompatible``: 409 with the reason if not; 422 if it cannot be loaded)
and warms it on the model thread; ``swap`` hands it to the batcher for the next batch (a
batch being scored finishes on the old one). One process reloads with ``reload`` (one at a
time); the workers of ``--workers N`` are each told to prepare, then all to swap, by their
supervisor (``dlrm.serve.workers``).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from dlrm.errors import ExportError
from dlrm.serve.batcher import Batcher
from dlrm.serve.body import BadRequest
from dlrm.serve.served import Served


class Reloader:
    def __init__(self, batcher: Batcher, on_swap: Callable[[Served, Served], None]) -> None:
        self.batcher, self.on_swap = batcher, on_swap
        self.lock = asyncio.Lock()

    async def prepare(self, path: str | Path) -> Served:
        """The model of ``path``, checked against the one serving and warm; BadRequest
        (409: it answers other requests; 422: it cannot be loaded) otherwise."""
        try:
            new = await run_in_threadpool(Served.load, path)
        except (ExportError, OSError, ValueError) as e:
            raise BadRequest(422, f"model {path}: {e}") from None
        why = self.batcher.model.incompatible(new)
        if why is not None:
            raise BadRequest(409, f"model {path} cannot replace the one serving: {why}")
        await asyncio.get_running_loop().run_in_executor(self.batcher.model_thread,
                                                         self.batcher.warm, new)
        return new

    def swap(self, new: Served) -> dict[str, Any]:
        """``new`` serves from the next batch on; the reload's event."""
        old, self.batcher.model = self.batcher.model, new
        gc.freeze()  # the new model's objects, out of the collector's sweeps (see app.py)
        self.on_swap(old, new)
        return {"event": "reload", "model": str(new.exported.path), "version": new.version,
                "previous": old.version}

    async def reload(self, path: str | Path) -> dict[str, Any]:
        async with self.lock:
            return self.swap(await self.prepare(path))
