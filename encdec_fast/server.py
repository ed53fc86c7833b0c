"""The HTTP server: a FastAPI app over an Engine, and `serve()`, which runs it with uvicorn.

    encdec-fast serve PATH --port 8000 --max-batch-size 64 [--api-key KEY]

Routes (JSON in, JSON out; errors are {"error": message, "type": exception name}):
  POST /v1/generate  {"input": "text" or [token ids], "stream": false, ...generate() arguments}
                     -> {"output_ids": [...], "text": "..." or null, "num_generated": n}
                     with "stream": true: server-sent events, one per token chunk
                         data: {"token_ids": [...], "text": "new text"}      ("text" for text inputs)
                     then `event: done` with the JSON above, or `event: error` with an error.
  GET  /health       200 {"status": "ready"} once the model is loaded and warmed; 503 while loading or
                     shutting down. Never needs the API key.
  GET  /metrics      Prometheus text: requests by status, generated tokens, queue depth, engine
                     waiting/running requests, request latency and time to first token histograms.

Limits (ServerLimits; each a command-line flag): max_queued requests admitted at once (running or
waiting in the engine; one more gets 429 with Retry-After, so the queue is never unbounded),
request_timeout_s (a request still unfinished is cancelled: 504, or an error event in a stream),
max_body_bytes (413), max_input_tokens (400, checked by the Engine), and api_key (401 without
`Authorization: Bearer KEY` or `X-API-Key: KEY` on every route but /health). A client that
disconnects cancels its request, which frees its decode slots at the engine's next step.

Model work stays on one thread: serve() loads the model and drives the engine from the main thread
and runs uvicorn's event loop in a second one (why: engine/scheduler.py, on OpenMP thread teams);
the event loop only validates, tokenises and queues. SIGTERM or SIGINT stops accepting connections,
lets the requests in flight finish (at most request_timeout_s), then closes the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from .errors import EncDecError, EngineClosedError, InvalidInputError, MissingDependencyError, RequestCancelledError

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.responses import StreamingResponse
except ImportError as e:  # pragma: no cover  (the test extra installs them)
    raise MissingDependencyError(f"the HTTP server needs FastAPI, uvicorn and prometheus-client ({e}); install them "
                                 "with: pip install 'encdec_fast[serve]'") from None

API_KEY_ENV = "ENCDEC_FAST_API_KEY"


@dataclass
class ServerLimits:
    """What the server admits. See the module docstring and the README's "Serving" section."""

    max_queued: int = 256  # requests admitted at once; more get 429 + Retry-After
    request_timeout_s: float = 120.0  # per request, from admission to its last token
    max_body_bytes: int = 1 << 20  # request body size
    max_input_tokens: int | None = None  # input length (None: the encoder's positions); passed to the Engine
    api_key: str | None = None  # None: open (serve() reads ENCDEC_FAST_API_KEY when no key is given)
    retry_after_s: int = 1  # the Retry-After header of 429 and 503 answers

    def __post_init__(self):
        for name in ("max_queued", "max_body_bytes", "retry_after_s"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {v!r}.")
        if not self.request_timeout_s > 0:
            raise InvalidInputError(f"request_timeout_s must be positive, got {self.request_timeout_s!r}.")
        if self.api_key == "":
            raise InvalidInputError("api_key is empty; pass a non-empty key, or none for an open server.")


class ServerState:
    """The app's engine (None until ready() is called) and its counters."""

    def __init__(self, engine, limits: ServerLimits, close_engine: bool):
        self.engine, self.limits, self.close_engine = engine, limits, close_engine
        self.in_flight = 0  # requests admitted and not answered yet (the event loop's thread only)
        self.shutting_down = False
        self.metrics = Metrics(self)

    def ready(self, engine):
        """Hands the app its (loaded and warmed) engine: /health answers 200 from now on."""
        self.engine = engine


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self, state: ServerState):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("encdec_fast_requests", "HTTP requests to /v1/generate, by status code", ["code"],
                                registry=r)
        self.tokens = Counter("encdec_fast_generated_tokens", "tokens generated for answered requests", registry=r)
        Gauge("encdec_fast_queue_depth", "requests admitted and not answered yet", registry=r).set_function(
            lambda: state.in_flight)
        waiting = Gauge("encdec_fast_engine_requests", "engine requests by state", ["state"], registry=r)
        waiting.labels("waiting").set_function(lambda: _engine_counts(state)[0])
        waiting.labels("running").set_function(lambda: _engine_counts(state)[1])
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = Histogram("encdec_fast_request_seconds", "time from admission to the last token of answered "
                                 "requests", buckets=buckets, registry=r)
        self.first_token = Histogram("encdec_fast_time_to_first_token_seconds", "time from admission to the first "
                                     "streamed chunk", buckets=buckets, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _engine_counts(state: ServerState):
    eng = state.engine
    if eng is None:
        return 0, 0
    s = eng.stats
    return s.requests_waiting, s.requests_running


# -- errors ----------------------------------------------------------------------------------------
def _status_of(exc: BaseException, refused: bool = False) -> int:
    """refused: raised when the request was submitted (its input or arguments), not while it ran."""
    if isinstance(exc, RequestCancelledError):
        return 504  # only the server cancels a request whose client is still there: its time limit
    if isinstance(exc, EngineClosedError):
        return 503
    if isinstance(exc, EncDecError) or (refused and isinstance(exc, (ValueError, TypeError))):
        return 400
    return 500


def _error_body(exc: BaseException) -> dict:
    return {"error": str(exc), "type": type(exc).__name__}


def _refused_body(exc: BaseException) -> dict:
    """The answer to a request refused when submitted: an encdec_fast error as it is; a TypeError or
    ValueError from deeper down (an argument of the wrong JSON type) named as the request's fault."""
    if isinstance(exc, EncDecError):
        return _error_body(exc)
    return {"error": f"invalid generate() arguments ({type(exc).__name__}: {exc}); check each argument's type "
                     "(numbers for lengths and probabilities, lists of ints for token ids).",
            "type": "InvalidInputError"}


class _Timeout(Exception):
    pass


def _timeout_body(limits: ServerLimits) -> dict:
    return {"error": f"the request did not finish within request_timeout_s={limits.request_timeout_s:g} s and was "
                     "cancelled; ask for fewer tokens, or raise the limit (--request-timeout).",
            "type": "RequestTimeout"}


# -- the app -----------------------------------------------------------------------------------------
def create_app(engine=None, *, limits: ServerLimits | None = None, close_engine: bool = False):
    """The FastAPI app over an encdec_fast Engine.

    engine: an Engine, or None when the caller hands it over later with app.state.encdec.ready(engine)
    (serve() does, once the model is loaded and warmed; until then /health and /v1/generate answer 503).
    close_engine: close the engine when the app shuts down (at the end of its lifespan)."""
    limits = limits or ServerLimits()
    state = ServerState(engine, limits, close_engine)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.shutting_down = True
        if state.close_engine and state.engine is not None:
            await asyncio.to_thread(state.engine.close)

    app = FastAPI(title="encdec_fast", lifespan=lifespan)
    app.state.encdec = state
    retry = {"Retry-After": str(limits.retry_after_s)}

    def refuse(status: int, body: dict, headers=None):
        state.metrics.requests.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health")
    async def health():
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers=retry)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/generate")
    async def generate(request: Request):
        engine = state.engine
        if engine is None or state.shutting_down:
            why = "the model is still loading" if engine is None else "the server is shutting down"
            return refuse(503, {"error": f"{why}; retry shortly.", "type": "Unavailable"}, retry)
        if state.in_flight >= limits.max_queued:
            return refuse(429, {"error": f"the server has max_queued={limits.max_queued} requests in flight; retry "
                                         "after the Retry-After seconds, or raise the limit (--max-queued).",
                                "type": "QueueFull"}, retry)
        state.in_flight += 1
        streaming = False
        try:
            try:
                body = await _read_body(request, limits.max_body_bytes)
            except _BodyTooLarge as e:
                return refuse(413, {"error": str(e), "type": "BodyTooLarge"})
            try:
                inp, stream, kwargs = _parse(body)
            except InvalidInputError as e:
                return refuse(400, _error_body(e))
            t0 = time.perf_counter()
            if stream:
                try:
                    token_stream = engine.stream(inp, **kwargs)
                except Exception as e:  # noqa: BLE001  a bad input or argument, or a closed engine
                    return refuse(_status_of(e, refused=True), _refused_body(e))
                streamed = _StreamedRequest(state, engine, token_stream, t0, isinstance(inp, str))
                streaming = True  # the response answers and counts from here on
                return _EventStream(streamed.events(), streamed.close, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})
            fut = engine.submit(inp, **kwargs)
            if fut.done() and fut.exception() is not None:  # refused when submitted
                return refuse(_status_of(fut.exception(), refused=True), _refused_body(fut.exception()))
            try:
                res = await _wait(request, fut, limits.request_timeout_s)
            except _Timeout:
                return refuse(504, _timeout_body(limits))
            except _Disconnected:
                state.metrics.requests.labels("499").inc()  # nobody to answer; nginx's code for it
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001  the request failed in the engine
                return refuse(_status_of(e), _error_body(e))
            state.metrics.latency.observe(time.perf_counter() - t0)
            state.metrics.tokens.inc(res.num_generated)
            state.metrics.requests.labels("200").inc()
            return {"output_ids": res.output_ids, "text": res.text, "num_generated": res.num_generated}
        finally:
            if not streaming:
                state.in_flight -= 1

    app.add_middleware(_APIKey, key=limits.api_key)
    return app


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _read_body(request, limit: int) -> bytes:
    """The body, refused past limit bytes (by Content-Length before reading, or while reading)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise _BodyTooLarge(f"the request body has {int(size)} bytes, more than max_body_bytes={limit}; send a "
                            "shorter input, or raise the limit (--max-body-bytes).")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _BodyTooLarge(f"the request body is longer than max_body_bytes={limit}; send a shorter input, or "
                                "raise the limit (--max-body-bytes).")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes):
    """-> (input, stream, generate kwargs) of a /v1/generate body; InvalidInputError when malformed."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"the request body is not valid JSON ({e}); send an object like "
                                '{"input": "some text", "max_new_tokens": 32}.') from None
    if not isinstance(obj, dict) or "input" not in obj:
        raise InvalidInputError('the request body must be a JSON object with an "input" field (a string, or a list '
                                'of token ids), plus generate() arguments, e.g. {"input": [101, 2023, 102]}.')
    obj = dict(obj)
    inp, stream = obj.pop("input"), obj.pop("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInputError(f'"stream" must be true or false, got {stream!r}.')
    if not isinstance(inp, str) and not (isinstance(inp, list) and all(type(i) is int for i in inp)):
        raise InvalidInputError('"input" must be a string or a list of integer token ids (one sequence).')
    return inp, stream, obj


async def _wait(request, fut, timeout: float):
    """The future's result; cancels the request if the client disconnects (_Disconnected) or the
    time limit passes (_Timeout) first."""
    result = asyncio.ensure_future(asyncio.wrap_future(fut))
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        return result.result()
    fut.cancel()  # frees the request's decode slots
    result.cancel()
    raise _Disconnected() if gone in done else _Timeout()


async def _until_disconnect(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class _StreamedRequest:
    """One streamed request: its server-sent events, and the bookkeeping when its response ends."""

    def __init__(self, state: ServerState, engine, stream, t0: float, is_text: bool):
        self.state, self.stream, self.t0 = state, stream, t0
        self.deltas = _TextDeltas(engine) if is_text else None
        self.status = "499"  # until it ends otherwise: the client went away
        self.closed = False

    async def events(self):
        """The events; the request is cancelled (in close()) when the client goes away (the response
        task is cancelled) or when its time limit passes."""
        limits, metrics, stream = self.state.limits, self.state.metrics, self.stream
        deadline, first = self.t0 + limits.request_timeout_s, True
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - time.perf_counter(), 0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                self.status = "504"
                yield _sse(_timeout_body(limits), "error")
                return
            except Exception as e:  # noqa: BLE001  the request failed in the engine
                self.status = str(_status_of(e))
                yield _sse(_error_body(e), "error")
                return
            if first:
                metrics.first_token.observe(time.perf_counter() - self.t0)
                first = False
            event = {"token_ids": chunk}
            if self.deltas is not None:
                event["text"] = self.deltas.feed(chunk)
            yield _sse(event)
        res = stream.result()  # iteration ended without an error: it has finished
        metrics.latency.observe(time.perf_counter() - self.t0)
        metrics.tokens.inc(res.num_generated)
        self.status = "200"
        yield _sse({"output_ids": res.output_ids, "text": res.text, "num_generated": res.num_generated}, "done")

    def close(self):
        """Once the response has ended, however it ended (even before its first event)."""
        if self.closed:
            return
        self.closed = True
        self.stream.close()  # no-op once finished
        self.state.in_flight -= 1
        self.state.metrics.requests.labels(self.status).inc()


class _TextDeltas:
    """New text per chunk: each sequence's tokens so far are decoded whole and the part not sent yet is
    returned. Held back while the text ends in an incomplete character; a tokenizer that rewrites
    earlier text (rare clean-ups) gets no delta for that chunk: the done event has the exact text."""

    def __init__(self, engine):
        self.engine = engine
        self.tokens: list[list[int]] = []
        self.sent: list[str] = []

    def feed(self, chunk):
        rows = chunk if chunk and isinstance(chunk[0], list) else [chunk]
        if not self.tokens:
            self.tokens, self.sent = [[] for _ in rows], ["" for _ in rows]
        out = []
        for i, new in enumerate(rows):
            self.tokens[i] += new
            text = self.engine.detokenize(self.tokens[i])
            delta = ""
            if not text.endswith("\ufffd") and text.startswith(self.sent[i]):
                delta, self.sent[i] = text[len(self.sent[i]):], text
            out.append(delta)
        return out if rows is chunk else out[0]


class _EventStream(StreamingResponse):
    """A streaming response that always watches for the client going away and then cancels the body
    (Starlette skips the watch for ASGI servers of spec 2.4, which report a disconnect only when the next
    chunk is sent, and a request still waiting for a decode slot sends nothing). on_end() runs when the
    response ends, however it ends."""

    def __init__(self, content, on_end, **kwargs):
        super().__init__(content, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def body():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while a chunk was sent
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.on_end()


class _APIKey:
    """ASGI middleware: every HTTP route but /health needs the key (Authorization: Bearer KEY, or
    X-API-Key: KEY), compared in constant time."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key")
        if given is None:
            why = "this server needs an API key: send the header 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')."
        elif not hmac.compare_digest(given, self.key):
            why = "the API key is wrong; send the key the server was started with (--api-key or ENCDEC_FAST_API_KEY)."
        else:
            return await self.app(scope, receive, send)
        body = json.dumps({"error": why, "type": "Unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


# -- running it ---------------------------------------------------------------------------------------
def warm_up(engine):
    """One short greedy request through the engine (first calls, buffers, CUDA graphs of small shapes)."""
    vocab = engine.model.cfg.encoder.vocab_size
    engine.generate([[min(5, vocab - 1)] * 8], max_new_tokens=4)


def serve(path, *, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          max_batch_size: int = 32, max_batch_tokens: int = 16384, device=None, dtype=None,
          log_level: str = "info", quantize=None) -> int:
    """Serves the checkpoint at path over HTTP until SIGTERM/SIGINT (see the module docstring). The socket
    is open while the model loads (/health answers 503 then). Returns 0 after a clean shutdown."""
    import uvicorn

    import encdec_fast

    limits = limits or ServerLimits()
    if limits.api_key is None and os.environ.get(API_KEY_ENV):
        limits = replace(limits, api_key=os.environ[API_KEY_ENV])
    app = create_app(None, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(limits.request_timeout_s) + 1)
    server = uvicorn.Server(config)
    loop_thread = threading.Thread(target=server.run, name="encdec_fast-http", daemon=True)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        loop_thread.start()
        while not server.started and loop_thread.is_alive():
            time.sleep(0.02)
        if not server.started:
            raise EncDecError(f"the HTTP server could not start on {host}:{port} (see the log above: a port in use?); "
                              "pick another --port.")
        model = encdec_fast.load(path, device=device, dtype=dtype, quantize=quantize)
        engine = encdec_fast.Engine(model, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                    max_input_tokens=limits.max_input_tokens)
        try:
            warm_up(engine)
            app.state.encdec.ready(engine)
            engine.drive(until=lambda: not loop_thread.is_alive())  # the model's work, on this thread
        finally:
            engine.close()
        loop_thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
    return 0
