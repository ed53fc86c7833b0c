"""Helpers of the HTTP server's tests (tests/test_server*.py): a tiny checkpoint with a tokenizer, uvicorn
serving an app in a thread, the engine driven from the test's thread, server-sent events, metrics, and
the server's error log."""

import contextlib
import json
import logging
import shutil
import socket
import threading
import time

import httpx
import torch
import uvicorn

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]  # 97 = the model's vocab


def checkpoint_with_tokenizer(make_ckpt, folder, vocab=VOCAB, **kw):
    """A tiny bert2gpt2 (make_ckpt(**kw)) copied to folder with a BERT tokenizer of vocab beside it (for text
    inputs)."""
    import transformers as T

    shutil.copytree(make_ckpt("bert", "gpt2", **kw), folder)
    T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def running(app):
    """uvicorn serving app on 127.0.0.1 at a free port, in a thread -> base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 30, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def driving(engine, fn):
    """fn() in a thread while this thread drives the engine, as serve() does: the model's work stays on
    the thread that has run torch so far (engine/scheduler.py says why that matters on a CPU)."""
    done, out = threading.Event(), {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised below
            out["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    engine.drive(until=done.is_set)
    done.wait()
    if "error" in out:
        raise out["error"]
    return out["value"]


def solo(model, ids, **kw):
    return model.generate(torch.tensor([ids]), **kw)[0].tolist()


def sse(lines):
    """(event, data) pairs of a server-sent event stream's lines."""
    out, event = [], "message"
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
            event = "message"
    return out


async def post(client, body):
    """-> (status, JSON answer); a stream's events are folded into its done event plus "chunks"."""
    if not body.get("stream"):
        r = await client.post("/v1/generate", json=body)
        return r.status_code, r.json()
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.headers["content-type"].startswith("application/json"):
            return r.status_code, json.loads(await r.aread())
        events = sse([line async for line in r.aiter_lines()])
    assert [e for e, _ in events[:-1]] == ["message"] * (len(events) - 1), events
    kind, last = events[-1]
    return r.status_code, {**last, "event": kind, "chunks": [d for _, d in events[:-1]]}


def metric(base, name, headers=None):
    for line in httpx.get(base + "/metrics", timeout=60, headers=headers).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def requests_total(base, code, route=None, headers=None) -> float:
    """encdec_fast_requests_total{code} summed over the routes, or of one route."""
    total = 0.0
    for line in httpx.get(base + "/metrics", timeout=60, headers=headers).text.splitlines():
        if line.startswith("encdec_fast_requests_total{") and f'code="{code}"' in line and \
                (route is None or f'route="{route}"' in line):
            total += float(line.split()[-1])
    return total


def wait_for(cond, timeout=60):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_errors():
    """-> the list of ERROR records uvicorn logs meanwhile ("Exception in ASGI application" and its
    traceback among them). Enter it inside running(): uvicorn configures its loggers when it starts."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, log = Keep(logging.ERROR), logging.getLogger("uvicorn.error")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)
