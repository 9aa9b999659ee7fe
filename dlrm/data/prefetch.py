"""Batches made ahead by a background thread, which stops when its consumer goes away."""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torchrec.datasets.utils import Batch

_END = object()


@dataclass
class _Failure:
    error: BaseException


def _produce_into(produce: Callable[[], Iterator[Batch]], out: queue.Queue,
                  stop: threading.Event) -> None:
    """The prefetch thread: puts batches, then _END or the error; quits when ``stop`` is set.

    It holds no reference to the consumer's iterator, so dropping that iterator is what
    stops it (see :class:`Prefetcher`).
    """

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    items = None
    try:
        items = produce()
        for item in items:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # handed over, raised in the consumer
        put(_Failure(e))
    finally:
        if items is not None:
            items.close()  # closes the open Parquet file when stopped early


class Prefetcher(Iterator[Batch]):
    """Iterator over batches made by a background thread, at most ``depth`` ahead.

    The producer's exception is raised here, in the consumer. Stopping early (``close()``,
    or dropping the iterator as ``itertools.islice`` or a ``break`` does) stops the thread
    at its next batch.
    """

    def __init__(self, produce: Callable[[], Iterator[Batch]], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self.thread = threading.Thread(target=_produce_into, name="ParquetBatches-prefetch",
                                       args=(produce, self._queue, self._stop), daemon=True)
        self.thread.start()
        _LIVE.add(self)

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if item is _END or isinstance(item, _Failure):
            self._done = True
            self.thread.join()
            if isinstance(item, _Failure):
                raise item.error
            raise StopIteration
        return item

    def close(self, timeout: float | None = None) -> None:
        """Stops the producer and waits (at most ``timeout`` seconds) for it to end."""
        self._shutdown()
        self.thread.join(timeout)

    def _shutdown(self) -> None:
        self._done = True
        self._stop.set()
        while True:  # free the batches made ahead
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._shutdown()  # no join: the thread ends by itself at its next batch


_LIVE: weakref.WeakSet[Prefetcher] = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
    """Ends every prefetch thread before the interpreter finalizes. A daemon thread still
    running then is cut off where it stands, and if that is inside pyarrow's C++ code the
    process aborts ("terminate called without an active exception") after a clean run."""
    for prefetcher in list(_LIVE):
        prefetcher.close(timeout=30)
