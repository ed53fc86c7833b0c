"""The HTTP server: a FastAPI app over an Engine, and `serve()`, which runs it with uvicorn.

    encdec-fast serve PATH --port 8000 --max-batch-size 64 [--api-key KEY] [--served-model-name NAME]

Routes (the bodies are server_api.py's pydantic models, so /openapi.json describes them):
  POST /v1/generate  {"input": "text" or [token ids], "stream": false, "seed": ..., ...generate() arguments}
                     -> {"output_ids": [...], "text": "..." or null, "num_generated": n}
                     with "stream": true: server-sent events, one per token chunk
                         data: {"token_ids": [...], "text": "new text"}      ("text" for text inputs)
                     then `event: done` with the JSON above, or `event: error` with an error.
  POST /v1/completions  OpenAI's completions API (server_openai.py): {"model", "prompt", "max_tokens", ...}
                     -> {"choices": [{"text", "index", "finish_reason"}], "usage": {...}, ...}, or OpenAI's
                     server-sent chunks ending with `data: [DONE]`; its errors take OpenAI's shape.
  GET  /v1/models    OpenAI's model list (and /v1/models/{model}, its card): the served model's name
                     (create_app's model_name).
  GET  /health       200 {"status": "ready"} once the model is loaded and warmed; 503 while loading, while
                     the engine is stuck ("degraded": its current turn has run longer than stalled_after_s,
                     from EngineStats.stalled_s), or shutting down. Never needs the API key.
  GET  /metrics      Prometheus text: requests by route and status, generated tokens, queue depth, engine
                     waiting/running requests, request latency and time to first token histograms.
Every error, on every route (404 and 405 included), is JSON {"error": message, "type": name} (on the
OpenAI routes: OpenAI's {"error": {"message", "type", "param", "code"}}) and is counted in
encdec_fast_requests_total{route, code}.

Limits (ServerLimits; each a command-line flag): body_timeout_s (a body still incomplete then gets 408
and its connection is closed: a slow client holds no capacity), max_body_bytes (413), max_queued
engine requests admitted at once (running or waiting in the engine; a completions request takes one per
prompt; admitted once the body is read and valid; one more gets 429 with Retry-After, so the queue is
never unbounded), request_timeout_s (a request still unfinished is cancelled: 504, or an error event in
a stream), max_input_tokens and max_request_tokens
(400, checked by the Engine serve() builds, with its max_batch_size on a request's decode rows), and api_key (401
without `Authorization: Bearer KEY` or `X-API-Key: KEY` on every route but
/health). A client that disconnects cancels its request, which frees its decode slots at the engine's
next step.

Model work stays on one thread: serve() loads the model and drives the engine from the main thread
and runs uvicorn's event loop in a second one (why: engine/scheduler.py, on OpenMP thread teams);
the event loop only validates, tokenises and queues. SIGTERM or SIGINT stops accepting connections,
lets the requests in flight finish (at most request_timeout_s), then closes the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from .errors import EncDecError, MissingDependencyError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException

    from . import server_openai
    from .server_api import (
        EXTRA_SCHEMAS,
        GENERATE_BODY,
        GENERATE_RESPONSES,
        APIKey,
        BodyRefused,
        Disconnected,
        Health,
        error_body,
        http_error,
        internal_error,
        parse_generate,
        refused_body,
        status_of,
        timeout_body,
    )
    from .server_core import (
        API_KEY_ENV,
        UNCOUNTED,
        Counted,
        EventStream,
        ServerLimits,
        ServerState,
        Timeout,
        admit,
        wait_all,
    )
except ImportError as e:  # pragma: no cover  (the test extra installs them)
    raise MissingDependencyError(f"the HTTP server needs FastAPI, uvicorn and prometheus-client ({e}); install them "
                                 "with: pip install 'encdec_fast[serve]'") from None

# -- the app -----------------------------------------------------------------------------------------
def create_app(engine=None, *, limits: ServerLimits | None = None, close_engine: bool = False,
               model_name: str | None = None):
    """The FastAPI app over an encdec_fast Engine.

    engine: an Engine, or None when the caller hands it over later with app.state.encdec.ready(engine)
    (serve() does, once the model is loaded and warmed; until then /health and the generating routes
    answer 503). close_engine: close the engine when the app shuts down (at the end of its lifespan).
    model_name: the name OpenAI clients pass as `model` (GET /v1/models lists it); default: the engine's
    checkpoint folder (model.path), else "encdec_fast"."""
    limits = limits or ServerLimits()
    state = ServerState(engine, limits, close_engine)
    if model_name is None:
        model_name = str(getattr(getattr(engine, "model", None), "path", None) or "encdec_fast")

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.shutting_down = True
        if state.close_engine and state.engine is not None:
            await asyncio.to_thread(state.engine.close)

    app = FastAPI(title="encdec_fast", lifespan=lifespan,
                  description="Generation over an EncoderDecoderModel checkpoint: encdec_fast's Engine over HTTP.")
    app.state.encdec = state
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    _add_state_routes(app, state)
    _add_generate(app, state)

    server_openai.add_routes(app, state, model_name)
    base_openapi = app.openapi

    def openapi():
        """FastAPI's schema, plus the request bodies the routes read themselves (FastAPI does not list them)
        and the data of stream events: GenerateRequest, StreamChunk, CompletionRequest."""
        if app.openapi_schema is None:
            schemas = base_openapi()["components"]["schemas"]
            for model in EXTRA_SCHEMAS + server_openai.EXTRA_SCHEMAS:
                schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            server_openai.name_the_model(app.openapi_schema, model_name)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(APIKey, key=limits.api_key)
    app.add_middleware(Counted, counter=state.metrics.requests, routes=app.routes)  # outside APIKey: counts its 401s
    return app


def _add_state_routes(app, state: ServerState):
    """GET /health and GET /metrics."""
    limits = state.limits
    retry = {"Retry-After": str(limits.retry_after_s)}

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "loading, degraded "
                                                                "(the engine is stuck in one turn) or shutting down"}})
    async def health(request: Request):
        request.scope[UNCOUNTED] = True  # a state, not a failed request
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers=retry)
        stalled = state.engine.stats.stalled_s
        if stalled > limits.stalled_after_s:
            why = (f"the engine's current turn has run {stalled:.1f} s, more than stalled_after_s="
                   f"{limits.stalled_after_s:g} s: a request is holding it; ready again when the turn ends")
            return JSONResponse({"status": "degraded", "stalled_s": round(stalled, 3), "reason": why}, status_code=503,
                                headers=retry)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus' text format", "content": {"text/plain": {}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_generate(app, state: ServerState):
    """POST /v1/generate."""
    limits = state.limits

    @app.post("/v1/generate", response_model=None, responses=GENERATE_RESPONSES, openapi_extra=GENERATE_BODY)
    async def generate(request: Request):
        """Generates for one input (see GenerateRequest; with "stream": true the answer is server-sent events)."""
        try:
            inp, stream, kwargs = await admit(state, request, parse_generate)
        except BodyRefused as e:
            return e.response()
        engine = state.engine
        streaming = False
        try:
            t0 = time.perf_counter()
            if stream:
                try:
                    token_stream = engine.stream(inp, **kwargs)
                except Exception as e:  # noqa: BLE001  a bad input or argument, or a closed engine
                    return JSONResponse(refused_body(e), status_of(e, refused=True))
                streamed = _StreamedRequest(state, engine, token_stream, t0, isinstance(inp, str))
                streaming = True  # the response answers and counts from here on
                request.scope[UNCOUNTED] = True
                return EventStream(streamed.events(), streamed.close, media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache"})
            fut = engine.submit(inp, **kwargs)
            if fut.done() and fut.exception() is not None:  # refused when submitted
                return JSONResponse(refused_body(fut.exception()), status_of(fut.exception(), refused=True))
            try:
                [res] = await wait_all(request, [fut], limits.request_timeout_s)
            except Timeout:
                return JSONResponse(timeout_body(limits.request_timeout_s), 504)
            except Disconnected:
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001  the request failed in the engine
                return JSONResponse(error_body(e), status_of(e))
            state.metrics.latency.observe(time.perf_counter() - t0)
            state.metrics.tokens.inc(res.num_generated)
            return JSONResponse({"output_ids": res.output_ids, "text": res.text, "num_generated": res.num_generated})
        finally:
            if not streaming:
                state.in_flight -= 1


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
                stream.close()  # cancelled before the client hears of it (it may send the next request at once)
                yield _sse(timeout_body(limits.request_timeout_s), "error")
                return
            except Exception as e:  # noqa: BLE001  the request failed in the engine
                self.status = str(status_of(e))
                yield _sse(error_body(e), "error")
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
        self.state.metrics.requests.labels("/v1/generate", self.status).inc()


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


# -- running it ---------------------------------------------------------------------------------------
def warm_up(engine):
    """One short greedy request through the engine (first calls, buffers, CUDA graphs of small shapes)."""
    vocab = engine.model.cfg.encoder.vocab_size
    engine.generate([[min(5, vocab - 1)] * 8], max_new_tokens=4)


def serve(path, *, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          max_batch_size: int = 32, max_batch_tokens: int = 16384, device=None, dtype=None,
          log_level: str = "info", model_name: str | None = None, quantize=None) -> int:
    """Serves the checkpoint at path over HTTP until SIGTERM/SIGINT (see the module docstring). The socket
    is open while the model loads (/health answers 503 then). model_name: what OpenAI clients pass as
    `model` (default: path as given). Returns 0 after a clean shutdown."""
    import uvicorn

    import encdec_fast

    limits = limits or ServerLimits()
    if limits.api_key is None and os.environ.get(API_KEY_ENV):
        limits = replace(limits, api_key=os.environ[API_KEY_ENV])
    app = create_app(None, limits=limits, model_name=model_name or str(path))
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
                                    max_input_tokens=limits.max_input_tokens,
                                    max_request_tokens=limits.max_request_tokens)
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
