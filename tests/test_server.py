"""The HTTP server, started for real with uvicorn on 127.0.0.1 and a free port, spoken to over HTTP:
100 concurrent clients get model.generate's tokens; streams concatenate to the non-streamed answer;
bad JSON, bad arguments, API keys, body and input limits, a full queue and time limits get their status
code and message; a client that goes away frees its decode slot; /health and /metrics; and
`encdec-fast serve` in a subprocess shuts down cleanly on SIGTERM with requests in flight."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import encdec_fast

httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the test extra installs uvicorn")
from serving import (  # noqa: E402
    checkpoint_with_tokenizer,
    driving,
    free_port,
    metric,
    post,
    running,
    solo,
    sse,
    wait_for,
)

from encdec_fast.server import ServerLimits, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet", "one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(make_ckpt, tmp_path_factory):
    """A tiny bert2gpt2 (1024 decoder positions: long budgets for the slow tests) with a BERT tokenizer."""
    return checkpoint_with_tokenizer(make_ckpt, tmp_path_factory.mktemp("served") / "ckpt", dec_kw={"positions": 1024})


@pytest.fixture(scope="module")
def model(ckpt):
    return encdec_fast.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def engine(model):
    with encdec_fast.Engine(model, max_batch_size=16, max_input_tokens=100) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, limits=ServerLimits(max_body_bytes=4096))) as base:
        yield base


def test_100_concurrent_clients_get_model_generates_tokens(url, model, engine):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(4, 97, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
              for _ in range(100)]
    budgets = torch.randint(1, 16, (100,), generator=g).tolist()
    bodies = [{"input": x, "max_new_tokens": b, "stream": i % 3 == 0} for i, (x, b) in enumerate(zip(inputs, budgets))]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(post(client, b) for b in bodies))

    answers = driving(engine, lambda: asyncio.run(main()))
    start = model.generation_config.decoder_start_token_id
    for body, (status, ans) in zip(bodies, answers):
        want = solo(model, body["input"], max_new_tokens=body["max_new_tokens"])
        assert status == 200 and ans["output_ids"] == want, (body, ans)
        assert ans["num_generated"] == len(want) - 1 and ans["text"] is None
        if body["stream"]:
            assert ans["event"] == "done"
            assert [start] + [t for c in ans["chunks"] for t in c["token_ids"]] == want


def test_text_inputs_stream_text_deltas(url, model, ckpt, engine):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(ckpt))
    body = {"input": "w1 w2 w3 w4", "max_new_tokens": 9, "eos_token_id": None}

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await post(client, body), await post(client, {**body, "stream": True})

    (s1, plain), (s2, streamed) = driving(engine, lambda: asyncio.run(main()))
    want = solo(model, tok("w1 w2 w3 w4")["input_ids"], max_new_tokens=9, eos_token_id=None)
    assert s1 == s2 == 200 and plain["output_ids"] == streamed["output_ids"] == want
    assert plain["text"] == streamed["text"] == tok.decode(want, skip_special_tokens=True)
    assert "".join(c["text"] for c in streamed["chunks"]) == plain["text"]


def test_bad_requests_get_400_or_413_with_the_error(url):
    big = {"input": list(range(4, 90)) * 20}  # > max_body_bytes = 4096
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, '"input" field'),
        (json.dumps({"input": [5, 6], "typical_p": 0.5}).encode(), 400, "typical_p"),
        (json.dumps({"input": [5, 600]}).encode(), 400, "outside the vocabulary"),
        (json.dumps({"input": [5, 6], "max_new_tokens": "many"}).encode(), 400, "max_new_tokens must be an int"),
        (json.dumps({"input": [5.5, 6]}).encode(), 400, "integer token ids"),
        (json.dumps({"input": [5, 6], "stream": "yes"}).encode(), 400, '"stream" must be'),
        (json.dumps({"input": [5] * 101}).encode(), 400, "max_input_tokens=100"),
        (json.dumps({"input": [5, 6], "stream": True, "do_sample": True, "temperature": 0.0}).encode(), 400, "temperature"),
        (json.dumps(big).encode(), 413, "max_body_bytes=4096"),
    ]
    with httpx.Client(base_url=url, timeout=60) as client:
        for body, status, words in cases:
            r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status and words in r.json()["error"], (body[:60], r.status_code, r.text)
        # a body without Content-Length is cut off while it is read
        data = json.dumps(big).encode()
        chunked = client.post("/v1/generate", content=iter([data[i:i + 1000] for i in range(0, len(data), 1000)]))
        assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["error"]


def test_api_key_is_needed_on_every_route_but_health(engine):
    with running(create_app(engine, limits=ServerLimits(api_key="s3cret"))) as base, \
            httpx.Client(base_url=base, timeout=60) as client:
        body = {"input": [5, 6], "max_new_tokens": 2}
        assert client.get("/health").status_code == 200
        for headers, words in (({}, "needs an API key"), ({"Authorization": "Bearer nope"}, "wrong")):
            for r in (client.post("/v1/generate", json=body, headers=headers), client.get("/metrics", headers=headers)):
                assert r.status_code == 401 and words in r.json()["error"]
        ok = client.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 3
        assert client.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(engine):
    """Holding the engine's drive lock stops it between turns: the two admitted requests stay in flight."""
    with running(create_app(engine, limits=ServerLimits(max_queued=2, retry_after_s=3))) as base:
        out = {}

        def call(i):
            out[i] = httpx.post(base + "/v1/generate", json={"input": [5, 6 + i], "max_new_tokens": 3}, timeout=60)

        with engine._sched.drive_lock:
            threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            wait_for(lambda: metric(base, "encdec_fast_queue_depth") == 2)
            full = httpx.post(base + "/v1/generate", json={"input": [5, 6]}, timeout=60)
        for t in threads:
            t.join(60)
        assert full.status_code == 429 and full.headers["retry-after"] == "3"
        assert "max_queued=2" in full.json()["error"]
        assert [out[i].status_code for i in range(2)] == [200, 200]
        assert httpx.post(base + "/v1/generate", json={"input": [5, 6], "max_new_tokens": 2}, timeout=60).status_code == 200


def test_the_request_time_limit_cancels_with_504(engine):
    with running(create_app(engine, limits=ServerLimits(request_timeout_s=0.3))) as base:
        cancelled = engine.stats.requests_cancelled
        with engine._sched.drive_lock:  # nothing runs: both time out
            plain = httpx.post(base + "/v1/generate", json={"input": [5, 6], "max_new_tokens": 3}, timeout=60)
            with httpx.stream("POST", base + "/v1/generate", json={"input": [5, 6], "stream": True}, timeout=60) as r:
                events = sse(r.iter_lines())
        assert plain.status_code == 504 and "request_timeout_s=0.3" in plain.json()["error"]
        assert r.status_code == 200 and events[-1][0] == "error" and events[-1][1]["type"] == "RequestTimeout"
        wait_for(lambda: engine.stats.requests_cancelled == cancelled + 2)


def test_a_client_that_goes_away_frees_its_slot(model):
    """One decode slot: a stream read for one event and dropped, and a plain request whose client
    gave up while it waited, are both cancelled; the next request runs at once."""
    with encdec_fast.Engine(model, max_batch_size=1) as eng, running(create_app(eng)) as base:
        with httpx.stream("POST", base + "/v1/generate", json={"input": [5, 6], "max_new_tokens": 1000,
                                                               "eos_token_id": None, "stream": True}, timeout=60) as r:
            first = next(r.iter_lines())
        assert first.startswith("data: ")
        wait_for(lambda: eng.stats.requests_cancelled == 1)
        with eng._sched.drive_lock:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(base + "/v1/generate", json={"input": [7, 8], "max_new_tokens": 1000}, timeout=0.5)
            wait_for(lambda: eng.stats.requests_cancelled == 2)
        after = httpx.post(base + "/v1/generate", json={"input": [9, 10], "max_new_tokens": 4}, timeout=60)
        stats = eng.stats
    assert after.status_code == 200 and after.json()["output_ids"] == solo(model, [9, 10], max_new_tokens=4)
    assert stats.decode_steps < 1000 and stats.requests_completed == 1


def test_health_waits_for_the_engine_and_metrics_count(engine):
    app = create_app(None)
    with running(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/health").status_code == 503 and client.get("/health").json()["status"] == "loading"
        r = client.post("/v1/generate", json={"input": [5]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        app.state.encdec.ready(engine)
        assert client.get("/health").json() == {"status": "ready"}
        n = [client.post("/v1/generate", json={"input": [5, 6, i], "max_new_tokens": 4}).json()["num_generated"]
             for i in range(3)]
        client.post("/v1/generate", content=b"{")
        text = client.get("/metrics").text
    assert 'encdec_fast_requests_total{code="200",route="/v1/generate"} 3.0' in text
    assert 'encdec_fast_requests_total{code="400",route="/v1/generate"} 1.0' in text
    assert 'encdec_fast_requests_total{code="503",route="/v1/generate"} 1.0' in text
    assert f"encdec_fast_generated_tokens_total {float(sum(n))}" in text
    assert "encdec_fast_request_seconds_count 3.0" in text and "encdec_fast_queue_depth 0.0" in text
    assert 'encdec_fast_engine_requests{state="waiting"} 0.0' in text


def test_serve_command_shuts_down_cleanly_on_sigterm(ckpt, model, tmp_path):
    """`encdec-fast serve` in a subprocess: requests in flight when SIGTERM arrives are all answered
    (streams to their done event); the process exits 0 and the port closes; nothing hangs."""
    port = free_port()
    env = {**os.environ, "ENCDEC_FAST_API_KEY": "k", "OMP_NUM_THREADS": "1"}  # see conftest.one_torch_thread
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "encdec_fast.cli", "serve", str(ckpt), "--port", str(port),
                             "--device", "cpu", "--max-batch-size", "4", "--log-level", "warning"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() - t0 < 120, "the server did not get ready"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        bodies = [{"input": [5 + i, 6, 7], "max_new_tokens": 300, "eos_token_id": None, "stream": i % 2 == 0}
                  for i in range(6)]

        async def one(client, body):
            if not body["stream"]:
                return await post(client, body)
            async with client.stream("POST", "/v1/generate", json=body) as r:
                events = sse([line async for line in r.aiter_lines()])
            return r.status_code, {**events[-1][1], "event": events[-1][0]}

        async def main():
            async with httpx.AsyncClient(base_url=base, timeout=120, headers=auth) as client:
                return await asyncio.gather(*(one(client, b) for b in bodies))

        result = {}
        clients = threading.Thread(target=lambda: result.update(answers=asyncio.run(main())))
        clients.start()
        wait_for(lambda: metric(base, "encdec_fast_queue_depth", auth) == len(bodies))  # all admitted, none done
        proc.send_signal(signal.SIGTERM)
        clients.join(120)
        assert not clients.is_alive(), "a client hangs"
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    for body, (status, ans) in zip(bodies, result["answers"]):
        assert status == 200 and ans["output_ids"] == solo(model, body["input"], max_new_tokens=300, eos_token_id=None)
        assert ans.get("event", "done") == "done"
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/health", timeout=5)


def test_serve_command_reports_a_port_in_use(ckpt, capsys):
    from encdec_fast.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(ckpt), "--port", str(port), "--log-level", "critical"]) == 2
    assert "could not start on 127.0.0.1" in capsys.readouterr().err
