"""``dlrm serve --workers N``: N server processes on one port, for hosts with more cores.

A supervisor binds the port and starts N workers (spawned: each loads the model itself)
that accept on the same socket. Each worker is a whole server (``app.create_app``) with a
pipe to the supervisor:

- **Reload.** ``POST /admin/reload`` on any worker, or SIGHUP to the supervisor, goes to
  the supervisor, which has every worker prepare the model (load, check, warm: 409 or 422
  from the first that refuses, and every worker discards it), then every worker swap it
  in; only then is the request answered, so whichever worker answers next serves the new
  model.
- **Metrics.** Each worker writes its metrics to a directory of the supervisor's
  (``PROMETHEUS_MULTIPROC_DIR``, ``prometheus_client``'s multiprocess mode); ``/metrics``
  on any worker sums them all.
- **Failure.** A worker that exits while not asked to is started again, with the model
  serving then; a worker whose supervisor is gone (killed) stops as on SIGTERM. SIGTERM or
  SIGINT to the supervisor: every worker finishes the requests it holds and exits, then
  the supervisor exits 0.

Each event is one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from dlrm.serve.body import BadRequest
from dlrm.serve.policy import Policy
from dlrm.utils.host import memory_bytes


class Link:
    """A worker's end of the supervisor's pipe (in the worker's event loop)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()  # one reload asked at a time by this worker
        self.answer: asyncio.Future | None = None
        self.pending: Any = None  # the model prepared, until told to swap or discard it

    def attach(self, reloader: Any) -> None:
        """Reads the supervisor's messages from now on (``reloader``: this worker's)."""
        self.reloader = reloader
        self.tasks: set[asyncio.Task] = set()
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._receive)

    async def reload(self, path: str) -> dict[str, Any]:
        """Every worker's reload of ``path``, through the supervisor."""
        async with self.lock:
            self.answer = asyncio.get_running_loop().create_future()
            self.conn.send(("reload", path))
            status, payload = await self.answer
        if status != 200:
            raise BadRequest(status, payload)
        return payload

    def _receive(self) -> None:
        while self.conn.poll():
            try:
                kind, *args = self.conn.recv()
            except (EOFError, OSError):  # the supervisor is gone (killed): stop, as asked
                asyncio.get_running_loop().remove_reader(self.conn.fileno())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if kind == "load":
                task = asyncio.get_running_loop().create_task(self._load(args[0]))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif kind == "swap":  # none prepared: a worker started after the loads
                event = None if self.pending is None else self.reloader.swap(self.pending)
                self.pending = None
                self.conn.send(("swapped", event))
            elif kind == "discard":
                self.pending = None
            elif kind == "answer" and self.answer is not None:
                self.answer.set_result(tuple(args))

    async def _load(self, path: str) -> None:
        try:
            self.pending = await self.reloader.prepare(path)
            self.conn.send(("loaded", 200, self.pending.version))
        except BadRequest as e:
            self.conn.send(("loaded", e.status, str(e)))
        except Exception as e:  # anything else of this worker's: the reload fails
            self.conn.send(("loaded", 500, f"model {path}: {type(e).__name__}: {e}"))


def _worker(sock: socket.socket, model: str, max_body_bytes: int, policy: Policy,
            conn: Connection) -> None:
    """A worker process: the whole server on the supervisor's socket."""
    from dlrm.serve.app import create_app, run_server
    from dlrm.serve.model_dir import load_exported

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's, to forward
    app = create_app(load_exported(model), max_body_bytes, policy, link=Link(conn))
    run_server(app, sockets=[sock])


@dataclass(eq=False)  # a worker is itself: one started in its place is another
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class Supervisor:
    def __init__(self, model: str, host: str, port: int, workers: int, max_body_bytes: int,
                 policy: Policy) -> None:
        self.model, self.started_with, self.count = model, model, workers
        self.args = (max_body_bytes, policy)
        try:
            self.sock = socket.create_server((host, port), backlog=2048)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        self.sock.set_inheritable(True)
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.asked: deque[tuple[_Worker | None, str]] = deque()  # reloads: (asker, path)
        self.messages: dict[_Worker, tuple] = {}  # the last unread one of each worker
        self.stopping = False

    def run(self) -> int:
        metrics = tempfile.mkdtemp(prefix="dlrm-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics  # the workers inherit it
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, lambda *_: self.asked.append((None, self.started_with)))
        try:
            self.workers = [self._start() for _ in range(self.count)]
            while not self.stopping:
                if wake_r in self._wait([wake_r]):
                    wake_r.recv(4096)
                while self.asked and not self.stopping:
                    self._reload(*self.asked.popleft())
            return self._shut_down()
        finally:
            signal.set_wakeup_fd(-1)
            shutil.rmtree(metrics, ignore_errors=True)

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _start(self) -> _Worker:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker, name="dlrm-serve-worker",
                                       args=(self.sock, self.model, *self.args, theirs))
        process.start()
        theirs.close()
        _event("worker_started", pid=process.pid, model=self.model)
        return _Worker(process, ours)

    def _wait(self, extra: list[Any]) -> set[Any]:
        """Waits for a message or a worker's exit: queues reload requests, keeps other
        messages in ``messages``, starts a worker in place of one that exited (unless
        stopping); which of ``extra`` are ready."""
        ready = set(wait([*extra, *(w.conn for w in self.workers),
                          *(w.process.sentinel for w in self.workers)]))
        for w in list(self.workers):
            exited = w.process.sentinel in ready
            if w.conn in ready:
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    exited = True  # its end of the pipe closed: it is gone
                else:
                    if message[0] == "reload":
                        self.asked.append((w, message[1]))
                    else:
                        self.messages[w] = message
            if exited and not self.stopping:
                w.process.join()
                _event("worker_exited", pid=w.process.pid, code=w.process.exitcode)
                _mark_dead(w.process.pid)
                self.messages[w] = ("exited",)
                self.workers[self.workers.index(w)] = self._start()
        return ready & set(extra)

    def _collect(self, targets: list[_Worker], kind: str) -> dict[_Worker, tuple]:
        """Each target's next ``kind`` message, or ``("exited",)`` for one that exited."""
        for w in targets:
            self.messages.pop(w, None)
        got: dict[_Worker, tuple] = {}
        while len(got) < len(targets) and not self.stopping:
            self._wait([])
            for w in targets:
                if self.messages.get(w, ("",))[0] in (kind, "exited"):
                    got[w] = self.messages.pop(w)
        return got

    def _reload(self, asker: _Worker | None, path: str) -> None:
        """Every worker prepares ``path``, then every one swaps it in; or all discard it.
        Then the asker (None: SIGHUP) is answered."""
        targets = list(self.workers)
        for w in targets:
            w.conn.send(("load", path))
        loaded = self._collect(targets, "loaded")
        refused = [loaded.get(w, ("exited",)) for w in targets
                   if loaded.get(w, ("exited",))[0] == "exited" or loaded[w][1] != 200]
        if refused:
            for w in self.workers:
                if w in targets:
                    w.conn.send(("discard",))
            first = refused[0]
            answer: tuple[int, Any] = (500, "a worker exited while loading") \
                if first[0] == "exited" else (first[1], first[2])
            _event("reload_refused", model=path, status=answer[0], error=answer[1])
        else:
            self.model = path  # what a worker started from now on loads
            for w in targets:
                w.conn.send(("swap",))
            swapped = [m[1] for m in self._collect(targets, "swapped").values()
                       if m[0] == "swapped" and m[1] is not None]
            answer = (200, {**swapped[0], "workers": len(targets)} if swapped else
                      {"event": "reload", "model": path, "workers": len(targets)})
            _event(**answer[1])
        if asker is not None and asker in self.workers:
            asker.conn.send(("answer", *answer))

    def _shut_down(self) -> int:
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()  # SIGTERM: it finishes its requests first
        codes = []
        for w in self.workers:
            w.process.join(timeout=60)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            codes.append(w.process.exitcode)
        _event("serve_stopped", workers=len(self.workers), exit_codes=codes)
        return 0


def _event(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _mark_dead(pid: int | None) -> None:
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)


WORKER_BYTES = 512 << 20  # a worker's own memory beside its model: torch and libraries


def auto_workers(model: str | Path, cores: int | None = None,
                 memory: int | None = None) -> int:
    """``--workers auto``: one per core this process may run on, as many as fit in half of
    its memory (the cgroup's limit where lower) at the model directory's size plus
    ``WORKER_BYTES`` each; at least 1."""
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    if memory is None:
        memory = memory_bytes()
    size = sum(f.stat().st_size for f in Path(model).rglob("*") if f.is_file())
    return max(1, min(cores, memory // 2 // (size + WORKER_BYTES)))


def serve_workers(model: str, host: str, port: int, workers: int, max_body_bytes: int,
                  policy: Policy) -> int:
    """Serves with ``workers`` processes until SIGTERM or SIGINT; the exit code."""
    supervisor = Supervisor(model, host, port, workers, max_body_bytes, policy)
    _event("serve", model=model, url=f"http://{host}:{port}", workers=workers,
           **policy.__dict__)
    return supervisor.run()
