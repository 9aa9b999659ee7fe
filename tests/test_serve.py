"""`dlrm serve`, the real server over real HTTP on loopback: predictions equal
`dlrm predict`'s, bad requests get their 4xx and the server goes on, concurrent requests
share forward passes, SIGTERM refuses new connections and lets the requests in flight
finish."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import numpy as np
import pytest
from helpers import Server

from dlrm.serve.batcher import Batcher
from dlrm.serve.served import Served


@pytest.fixture(scope="module")
def served(exported):
    """An fp32 export (a server of it), the raw held-out day's first rows as fields, and
    their predictions from `dlrm predict`."""
    model, rows, probs = exported
    server = Server(model)
    yield model, server, rows, probs
    server.stop()


def test_predictions_over_http_equal_dlrm_predict(served, trained):
    _, server, rows, probs = served
    columns = server.get("/metadata")[1]["columns"]
    status, got = server.post("/predict", {"rows": rows[:256]})
    assert status == 200
    np.testing.assert_allclose(got["predictions"], probs[:256], rtol=0, atol=1e-6)
    # Objects by column name, without the label and with numbers as numbers.
    objects = [{c: (int(v) if c.startswith("I") and v else v or None)
                for c, v in zip(columns, row, strict=True) if c != "label"} for row in rows[:5]]
    status, got = server.post("/predict", {"rows": objects})
    assert status == 200
    np.testing.assert_allclose(got["predictions"], probs[:5], rtol=0, atol=1e-6)
    status, meta = server.get("/metadata")
    assert meta["tables"] == "fp32" and meta["schema"]["name"] == "criteo"
    assert meta["checkpoint"] == str(trained.resolve())
    assert meta["step"] == int(trained.name.removeprefix("step-")) > 0


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, '"rows"'),
    (b'{"rows": [NaN]}', 400, "not a number JSON allows"),
    (b'{"rows": []}', 422, "non-empty"),
    (b'{"rows": [5]}', 422, "row 0: expected an object or a list"),
    (b'{"rows": [{"I1": 1}]}', 422, "missing field(s) I2"),
    (b'{"rows": [["1", "2"]]}', 422, "2 values, expected 40"),
])
def test_bad_requests_get_their_4xx_and_the_server_goes_on(served, body, status, words):
    _, server, _, _ = served
    got, payload = server.post("/predict", body)
    assert got == status and words in payload["error"], payload
    assert server.get("/health")[0] == 200


def test_field_errors_name_the_row_and_field(served):
    _, server, rows, _ = served
    columns = server.get("/metadata")[1]["columns"]
    good = dict(zip(columns, rows[0], strict=True))
    cases = [({**good, "C99": "x"}, "unknown field(s) C99"),
             ({**good, "I3": {"a": 1}}, "row 0, field I3: expected a number or a string"),
             ({**good, "I3": True}, "got a boolean"),
             ({**good, "I3": 10**30}, "row 0: bad_dense"),
             ({**good, "I3": "seven"}, "row 0: bad_dense"),
             ({**good, "C3": "not-hex"}, "row 0: bad_categorical")]
    for row, words in cases:
        status, payload = server.post("/predict", {"rows": [good, row]})
        assert status == 422 and words.replace("row 0", "row 1") in payload["error"], payload
    overflow = json.dumps({"rows": [{**good, "I3": 1.5e300}]}).replace("1.5e+300", "1e999")
    status, payload = server.post("/predict", overflow.encode())
    assert status == 422 and "row 0, field I3: not a finite number" in payload["error"]
    huge = json.dumps({"rows": [good] * 40_000}).encode()  # about 10 MB
    assert len(huge) > 8 << 20
    status, payload = server.post("/predict", huge)
    assert status == 413 and "limit" in payload["error"]
    assert server.post("/predict", {"rows": [good]})[0] == 200


def test_concurrent_requests_are_batched_and_answered_in_order(served):
    """16 requests sent together while three large ones keep the model busy: each gets its
    own rows' predictions, and fewer forward passes than requests scored them."""
    _, server, rows, probs = served
    results: dict[int, list[float]] = {}

    def ask(k: int) -> None:
        part = rows[k * 10:(k + 1) * 10]
        status, got = server.post("/predict", {"rows": part})
        assert status == 200
        results[k] = got["predictions"]

    def busy(k: int) -> None:
        status, got = server.post("/predict", {"rows": rows * 8})  # 2400 rows, under 1 MB
        assert status == 200
        results[k] = got["predictions"]

    before = server.get("/health")[1]
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(16)]
    first = [threading.Thread(target=busy, args=(-k,)) for k in range(1, 4)]
    for t in first:
        t.start()
    time.sleep(0.05)
    for t in threads:
        t.start()
    for t in [*first, *threads]:
        t.join()
    for k in range(16):
        np.testing.assert_allclose(results[k], probs[k * 10:(k + 1) * 10], rtol=0, atol=1e-6)
    for k in range(1, 4):
        np.testing.assert_allclose(results[-k], np.tile(probs[:300], 8), rtol=0, atol=1e-6)
    after = server.get("/health")[1]
    assert after["requests"] - before["requests"] == 19
    assert after["scored_requests"] - before["scored_requests"] == 19
    passes = after["batches"] - before["batches"]
    print(f"{passes} forward passes for 19 requests")
    assert passes < 19, passes  # some requests shared a forward pass


def test_requests_waiting_together_are_scored_in_one_pass(served):
    """The batcher itself: 16 requests queued while the model was busy are one forward pass,
    and each gets its own rows' predictions back."""
    model, _, rows, probs = served
    served_model = Served.load(model)
    requests = [rows[k * 3:(k + 1) * 3] for k in range(16)]

    async def go() -> tuple[int, list]:
        batcher = Batcher(served_model)
        waiting = [asyncio.ensure_future(batcher.score(r)) for r in requests]
        await asyncio.sleep(0.05)  # all queued before the batcher looks
        runner = asyncio.create_task(batcher.run())
        outputs = await asyncio.gather(*waiting)
        runner.cancel()
        return batcher.batches, outputs

    batches, outputs = asyncio.run(go())
    assert batches == 1
    np.testing.assert_allclose(np.concatenate(outputs), probs[:48], rtol=0, atol=1e-6)


def test_sigterm_refuses_new_connections_and_finishes_the_requests_in_flight(served):
    model, _, rows, probs = served
    server = Server(model, "--max-body-mb", "64")
    big = {"rows": rows * 100}  # 30k rows each: long enough to be in flight
    answers: list[tuple[int, int]] = []
    answered: list[float] = []

    def ask() -> None:
        status, got = server.post("/predict", big, timeout=120)
        answers.append((status, len(got.get("predictions", []))))
        answered.append(time.time())

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the bodies are sent and being read or scored
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10  # the loop may be parsing a body when the signal comes
    while True:
        try:
            server.get("/health")
        except ConnectionRefusedError:  # it no longer listens...
            break
        except ConnectionResetError:  # a connection queued as the socket closed
            pass
        assert time.time() < deadline, "still accepting connections 10 s after SIGTERM"
        time.sleep(0.05)
    refused = time.time()
    assert server.proc.poll() is None  # ...while it finishes the requests in flight
    assert server.proc.wait(timeout=60) == 0
    for t in threads:
        t.join()
    assert answers == [(200, 30_000)] * 3
    assert max(answered) > refused  # they were in flight when the new one was refused


def test_health_counts_every_request_answered_or_refused(served):
    _, server, rows, _ = served
    before = server.get("/health")[1]
    assert server.post("/predict", {"rows": rows[:2]})[0] == 200
    assert server.post("/predict", {"rows": [{"nope": 1}]})[0] == 422
    assert server.post("/recommend", {"user": {}})[0] == 404  # Criteo names no items
    after = server.get("/health")[1]
    assert after["requests"] - before["requests"] == 3
    assert after["predict_requests"] - before["predict_requests"] == 2
    assert after["recommend_requests"] - before["recommend_requests"] == 1
    assert after["refused_requests"] - before["refused_requests"] == 2
    assert after["scored_requests"] - before["scored_requests"] == 1
