"""Micro-batched scoring of the requests a server receives concurrently.

A request's rows wait in a bounded queue as the JSON they came as. One batch at a time is
taken from the waiting requests (up to ``max_batch_rows`` rows; a request larger than that
alone, waiting up to ``max_wait_ms`` after the first for others); all its rows are turned
into fields, converted in one pass and scored in one forward pass, and each request gets
its own outputs. A batch of a few rows (``scalar_rows.MAX_ROWS``) is converted value by
value and scored on the event loop itself: under a millisecond, less than handing it to
a thread would cost, as both need the GIL (measured: 25% more requests/s). A larger one
is converted vectorised, as a file's rows, on the model thread, while the loop goes on
serving. A request whose rows cannot be read gets its own ``RowsError`` (naming its row
and field); its batch-mates are scored all the same. Past
``max_queue`` waiting requests a request is refused at once (``Overloaded``: 503); one not
scored within ``timeout_s`` gets ``TimeoutError`` (504) and is dropped from its batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlrm.serve.policy import DEFAULT_POLICY, Policy
from dlrm.serve.request_rows import RequestRows, RowsError
from dlrm.serve.scalar_rows import MAX_ROWS
from dlrm.serve.served import Served


class Overloaded(Exception):
    """The queue holds ``max_queue`` requests already: the server refuses this one."""


@dataclass
class _Waiting:
    rows: list[Any]
    future: asyncio.Future


class Batcher:
    """``await batcher.score(rows)`` from any request; ``batcher.run()`` scores them."""

    def __init__(self, served: Served, policy: Policy = DEFAULT_POLICY,
                 observe: Callable[[int], None] = lambda rows: None,
                 depth: Callable[[int], None] = lambda waiting: None) -> None:
        """``observe``: told each batch's rows; ``depth``: the requests waiting, as it
        changes."""
        self.model = served  # swapped whole by a reload, read once per batch
        self.policy, self.observe, self.depth = policy, observe, depth
        self.queue: asyncio.Queue[_Waiting] = asyncio.Queue(policy.max_queue)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batches = self.requests = 0
        self._carry: _Waiting | None = None  # taken, but too large for the last batch

    async def score(self, rows: list[Any]) -> np.ndarray:
        """The outputs of ``rows``; RowsError, Overloaded or TimeoutError."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.queue.put_nowait(_Waiting(rows, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.policy.max_queue} requests are waiting already") from None
        self.depth(self.queue.qsize())
        if not self.policy.timeout_s:
            return await future
        timer = loop.call_later(self.policy.timeout_s, _expire, future)  # wait_for's job,
        try:  # without its task and callbacks per request
            return await future
        finally:
            timer.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            self.depth(self.queue.qsize())
            live = [w for w in batch if not w.future.done()]  # timed out: not scored
            if not live:
                continue
            try:
                if sum(map(_size, live)) <= MAX_ROWS:  # under a millisecond: scored here,
                    results = self.score_now(live)  # a hand-off to a thread costs more
                else:
                    results = await loop.run_in_executor(self.model_thread, self.score_now,
                                                         live)
            except Exception as e:  # a failure of this batch only
                results = [e] * len(live)
            self.batches += 1
            self.requests += sum(not isinstance(r, Exception) for r in results)  # scored
            for w, result in zip(live, results, strict=True):
                if w.future.done():  # a client that went away leaves a cancelled one
                    continue
                if isinstance(result, Exception):
                    w.future.set_exception(result)
                else:
                    w.future.set_result(result)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Waiting]:
        first, self._carry = self._carry or await self.queue.get(), None
        batch, rows = [first], _size(first)
        deadline = loop.time() + self.policy.max_wait_ms / 1000
        while rows < self.policy.max_batch_rows:
            if not self.queue.empty():
                nxt = self.queue.get_nowait()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + _size(nxt) > self.policy.max_batch_rows:
                self._carry = nxt  # first of the next batch
                break
            batch.append(nxt)
            rows += _size(nxt)
        return batch

    def warm(self, served: Served) -> None:
        """Scores a row of missing values through each of ``served``'s paths (on the
        model thread: their first calls are the slow ones)."""
        fields = served.rows.fields([dict.fromkeys(served.rows.required)])
        few = served.scalar.rows(fields) if served.scalar is not None else None
        if few is not None:
            served.scorer.outputs(few)
        block, reasons = served.rows.convert(fields)
        RequestRows.check(reasons)
        served.scorer.score(block)

    def score_now(self, batch: list[_Waiting]) -> list[np.ndarray | Exception]:
        """Each request's outputs, or the error of its own rows."""
        model = self.model
        results: list[np.ndarray | Exception | None] = [None] * len(batch)
        parts = []  # each readable request's fields
        spans = []  # (request, first row, end) in the batch's rows
        total = 0
        for k, w in enumerate(batch):
            try:
                own = model.rows.fields(w.rows)
            except RowsError as e:
                results[k] = e
                continue
            n = len(own[model.rows.columns[0]])
            parts.append(own)
            spans.append((k, total, total + n))
            total += n
        if not spans:
            return results  # type: ignore[return-value]
        few = None
        if model.scalar is not None and total <= MAX_ROWS:  # each request's fields: lists
            few = model.scalar.rows(parts[0] if len(parts) == 1 else
                                    {c: [v for p in parts for v in p[c]] for c in parts[0]})
        if few is not None:
            outputs, reasons = model.scorer.outputs(few), np.full(total, -1)
        else:
            block, reasons = model.rows.convert(*parts)
            _, outputs = model.scorer.score(block)
        good = reasons < 0
        self.observe(int(good.sum()))
        position = np.cumsum(good) - 1  # a good row's index among the scored ones
        for k, start, end in spans:
            try:
                RequestRows.check(reasons[start:end])
                results[k] = outputs[position[start:end]]
            except RowsError as e:
                results[k] = e
        return results  # type: ignore[return-value]


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _size(w: _Waiting) -> int:
    return len(w.rows) if isinstance(w.rows, list) else 1
