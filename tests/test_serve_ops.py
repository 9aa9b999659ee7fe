"""`dlrm serve` in operation: batches converted as one, each request's errors its own, a
bounded queue, a timeout, readiness, Prometheus metrics and the access log."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import numpy as np
import pytest
from helpers import Server
from prometheus_client.parser import text_string_to_metric_families

from dlrm.serve.app import create_app
from dlrm.serve.batcher import Batcher, Overloaded
from dlrm.serve.model_dir import load_exported
from dlrm.serve.policy import Policy
from dlrm.serve.request_rows import FEW_ROWS, RowsError
from dlrm.serve.scalar_rows import MAX_ROWS
from dlrm.serve.served import Served


@pytest.fixture(scope="module")
def model(exported):
    return exported


def _batcher(model_dir, policy: Policy | None = None) -> Batcher:
    return Batcher(Served.load(model_dir), policy or Policy())


def _queued_then_scored(model_dir, requests: list) -> tuple[int, list]:
    """(forward passes, each request's outputs or error) of requests all queued before
    the batcher looks."""
    async def go():
        batcher = _batcher(model_dir)
        waiting = [asyncio.ensure_future(batcher.score(r)) for r in requests]
        await asyncio.sleep(0.05)
        runner = asyncio.create_task(batcher.run())
        got = await asyncio.gather(*waiting, return_exceptions=True)
        runner.cancel()
        return batcher.batches, got

    return asyncio.run(go())


def test_a_bad_request_fails_alone_and_its_batch_mates_are_scored(model):
    model_dir, rows, probs = model
    bad_dense = [list(r) for r in rows[3:6]]
    bad_dense[1][1] = "not-a-number"  # I1 of its second row
    requests = [rows[0:3], bad_dense, [{"nope": 1}], rows[6:9], rows[9:10]]

    batches, got = _queued_then_scored(model_dir, requests)
    assert batches == 1  # one conversion, one forward pass for all five
    np.testing.assert_allclose(got[0], probs[0:3], rtol=0, atol=1e-6)
    assert isinstance(got[1], RowsError) and str(got[1]) == \
        "1 row(s) cannot be read: row 1: bad_dense"  # its own row number
    assert isinstance(got[2], RowsError) and "row 0: unknown field(s) nope" in str(got[2])
    np.testing.assert_allclose(got[3], probs[6:9], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[4], probs[9:10], rtol=0, atol=1e-6)


def test_large_requests_read_by_column_fail_alone_too(model):
    """Requests over FEW_ROWS rows are read column by column; one with a bad value, one
    with a value that is no string and one with a lone surrogate (no Unicode) fail alone,
    each naming its own row, in a batch with a good one and a small one."""
    model_dir, rows, probs = model
    n = FEW_ROWS + 8
    bad_dense = [list(r) for r in rows[:n]]
    bad_dense[FEW_ROWS + 2][1] = "1.5"  # an integer column
    number = [list(r) for r in rows[:n]]
    number[3][14] = 7  # a hex categorical given as a JSON number: read row by row, alike
    surrogate = [list(r) for r in rows[:n]]
    surrogate[5][20] = "\ud800"
    null, empty = [list(r) for r in rows[:n]], [list(r) for r in rows[:n]]
    null[4][15], empty[4][15] = None, ""  # null: a missing value, as an empty field
    requests = [rows[n:2 * n], bad_dense, number, surrogate, rows[:2], null, empty]

    batches, got = _queued_then_scored(model_dir, requests)
    assert batches == 1
    np.testing.assert_allclose(got[0], probs[n:2 * n], rtol=0, atol=1e-6)
    assert str(got[1]) == f"1 row(s) cannot be read: row {FEW_ROWS + 2}: bad_dense"
    assert isinstance(got[2], np.ndarray)  # 7 is a categorical's own text, as "7"
    assert isinstance(got[3], RowsError) and str(got[3]) == (
        "row 5, field C7: not Unicode text (a lone surrogate)")
    np.testing.assert_allclose(got[4], probs[:2], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[5], got[6])
    assert not np.allclose(got[5][4], probs[4], rtol=0, atol=1e-6)  # the value mattered


def test_batches_keep_to_max_batch_rows_and_a_larger_request_goes_alone(model):
    model_dir, rows, probs = model
    sizes = [3, 3, 10, 2, 2]  # with at most 5 rows a batch: [3], [3], [10] alone, [2, 2]
    starts = np.cumsum([0, *sizes])
    requests = [rows[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]

    async def go():
        batcher = _batcher(model_dir, Policy(max_batch_rows=5))
        seen: list[int] = []
        batcher.observe = seen.append
        waiting = [asyncio.ensure_future(batcher.score(r)) for r in requests]
        await asyncio.sleep(0.05)
        runner = asyncio.create_task(batcher.run())
        got = await asyncio.gather(*waiting)
        runner.cancel()
        return seen, got

    seen, got = asyncio.run(go())
    assert seen == [3, 3, 10, 4]
    np.testing.assert_allclose(np.concatenate(got), probs[:20], rtol=0, atol=1e-6)


def test_a_full_queue_refuses_and_a_late_request_times_out(model):
    model_dir, rows, _ = model

    async def go():
        batcher = _batcher(model_dir, Policy(max_queue=2, timeout_s=0.2))
        hold = threading.Event()
        batcher.model_thread.submit(hold.wait)  # the model is busy
        runner = asyncio.create_task(batcher.run())
        # taken, waits for the model thread (too many rows to be scored on the loop)
        first = asyncio.ensure_future(batcher.score(rows[:MAX_ROWS + 1]))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.score(rows[:1])) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.score(rows[:1])
        got = await asyncio.gather(first, *queued, return_exceptions=True)
        hold.set()
        for _ in range(100):  # the timed-out requests are dropped as the batcher reaches them
            await asyncio.sleep(0.01)
            if batcher.queue.empty():
                break
        after = await batcher.score(rows[:2])  # and it goes on
        runner.cancel()
        return got, after

    got, after = asyncio.run(go())
    assert all(isinstance(g, TimeoutError) for g in got), got
    assert after.shape == (2,)


def test_ready_is_503_until_the_model_is_warm(model):
    model_dir, _, _ = model
    app = create_app(load_exported(model_dir), access_log=False)
    hold = threading.Event()
    app.state.batcher.model_thread.submit(hold.wait)  # warming cannot finish yet

    async def go():
        startup: asyncio.Queue = asyncio.Queue()
        await startup.put({"type": "lifespan.startup"})
        messages: list[dict] = []

        async def lifespan_send(m):
            messages.append(m)

        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                           startup.get, lifespan_send))
        while not messages:
            await asyncio.sleep(0.01)
        async def ask_ready():
            sent: list[dict] = []

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(m):
                sent.append(m)

            await app({"type": "http", "method": "GET", "path": "/ready",
                       "raw_path": b"/ready", "query_string": b"", "headers": [],
                       "scheme": "http", "server": ("t", 80), "client": ("t", 1),
                       "http_version": "1.1", "root_path": ""}, receive, send)
            return sent[0]["status"], json.loads(sent[1]["body"]), app.state.batcher.batches

        answers = [await ask_ready()]
        hold.set()
        for _ in range(1000):  # warm-up: one row through the model thread, then ready
            answers.append(await ask_ready())
            if answers[-1][0] == 200:
                break
            await asyncio.sleep(0.01)
        await startup.put({"type": "lifespan.shutdown"})
        await lifespan
        return messages[0]["type"], answers

    started, answers = asyncio.run(go())
    assert started == "lifespan.startup.complete"
    version = answers[-1][1]["version"]
    assert answers[0] == (503, {"ready": False, "version": version}, 0)
    assert answers[-1] == (200, {"ready": True, "version": version}, 1)  # after the warm row


def test_metrics_in_prometheus_format_and_one_log_line_per_request(model):
    model_dir, rows, probs = model
    server = Server(model_dir)
    try:
        for _ in range(300):
            status, _ = server.get("/ready")
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200
        for k in range(5):
            status, got = server.post("/predict", {"rows": rows[k:k + 2]})
            assert status == 200
        assert server.post("/predict", {"rows": [["x"]]})[0] == 422
        version = server.get("/metadata")[1]["version"]
        text = server.get_text("/metrics")
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value
                for s in families["dlrm_requests"].samples if s.name == "dlrm_requests_total"}
    assert requests[("/predict", "200")] == 5 and requests[("/predict", "422")] == 1
    rows_count = [s.value for s in families["dlrm_batch_rows"].samples
                  if s.name == "dlrm_batch_rows_count"]
    rows_sum = [s.value for s in families["dlrm_batch_rows"].samples
                if s.name == "dlrm_batch_rows_sum"]
    assert rows_count[0] >= 6 and rows_sum[0] == 1 + 5 * 2  # the warm-up row, then ours
    latency = [s for s in families["dlrm_request_seconds"].samples
               if s.name == "dlrm_request_seconds_count" and s.labels["endpoint"] == "/predict"]
    assert latency[0].value == 6
    info = families["dlrm_model_info"].samples[0]
    assert info.labels["version"] == version
    assert [s.value for s in families["dlrm_queue_depth"].samples] == [0]
    log = [json.loads(line) for line in server.output()[0].splitlines()
           if line.startswith('{"event": "request"')]
    predicts = [e for e in log if e["path"] == "/predict"]
    assert [e["status"] for e in predicts] == [200] * 5 + [422]
    assert all(e["method"] == "POST" and e["ms"] > 0 for e in predicts)


def test_over_the_queue_limit_every_request_is_answered(model):
    """Many concurrent large requests against a queue of one: some are refused with 503
    and Retry-After, the others scored right; none goes unanswered."""
    model_dir, rows, probs = model
    server = Server(model_dir, "--max-queue", "1", "--max-body-mb", "64")
    answers: list[tuple[int, object]] = []
    big = {"rows": rows * 20}  # 6000 rows: slow enough for the queue to fill

    body = json.dumps(big).encode()

    def ask() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            conn.request("POST", "/predict", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answers.append((resp.status, resp.getheader("Retry-After"),
                            json.loads(resp.read())))
        finally:
            conn.close()

    try:
        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    finally:
        server.stop()
    assert len(answers) == 12
    statuses = sorted(s for s, _, _ in answers)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for status, retry, got in answers:
        if status == 200:
            np.testing.assert_allclose(got["predictions"][:300], probs[:300], rtol=0, atol=1e-6)
        else:
            assert retry == "1" and "overloaded" in got["error"]


def test_a_reload_under_load_drops_no_request_and_refuses_a_model_of_other_requests(
        model, reloadable, tmp_path):
    """16 clients for a few seconds, a reload midway (an int8 export of the same
    checkpoint: other predictions, the same requests): every answer is a 200 with the old
    model's predictions or the new one's, the old one's before the reload was asked, the
    new one's once it answered. A model of other requests is refused (409), a directory
    that is none (422), and the new model keeps serving."""
    model_dir, rows, old_probs = model
    new_dir, new_probs, other = reloadable

    server = Server(model_dir)
    answers: list[tuple[float, float, int, list]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.time()
            status, got = server.post("/predict", {"rows": rows[:4]})
            answers.append((start, time.time(), status, got.get("predictions")))

    try:
        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(2)
        asked = time.time()
        status, got = server.post("/admin/reload", {"model": str(new_dir)})
        swapped = time.time()
        assert status == 200 and got["previous"] != got["version"], got
        time.sleep(2)
        refused = server.post("/admin/reload", {"model": str(other)})
        missing = server.post("/admin/reload", {"model": str(tmp_path / "nowhere")})
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        after = server.post("/predict", {"rows": rows[:4]})
        version = server.get("/metadata")[1]["version"]
    finally:
        server.stop()
    assert refused[0] == 409 and "label" in refused[1]["error"], refused
    assert missing[0] == 422, missing
    assert version == got["version"]
    np.testing.assert_allclose(after[1]["predictions"], new_probs, rtol=0, atol=1e-6)
    assert len(answers) > 100 and all(a[2] == 200 for a in answers)
    for start, end, _, preds in answers:
        is_old = np.allclose(preds, old_probs[:4], rtol=0, atol=1e-6)
        is_new = np.allclose(preds, new_probs, rtol=0, atol=1e-6)
        assert is_old or is_new
        if end < asked:
            assert is_old
        if start > swapped:
            assert is_new
    assert any(a[1] < asked for a in answers) and any(a[0] > swapped for a in answers)
