"""What the server's routes share (server.py's /v1/generate, server_openai.py's /v1/completions): its limits and
state, its metrics, the admission of a request (body read and validated before it takes a place in the queue),
waiting for an engine's futures, the middleware that counts every answer, and the event stream that watches
for the client going away.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .errors import InvalidInputError, MissingDependencyError

try:
    import anyio
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.responses import StreamingResponse
    from starlette.routing import Match

    from .server_api import BodyRefused, Disconnected, error_body, read_body
except ImportError as e:  # pragma: no cover  (the test extra installs them)
    raise MissingDependencyError(f"the HTTP server needs FastAPI, uvicorn and prometheus-client ({e}); install them "
                                 "with: pip install 'encdec_fast[serve]'") from None

API_KEY_ENV = "ENCDEC_FAST_API_KEY"


@dataclass
class ServerLimits:
    """What the server admits. See the module docstring and the README's "Serving" section."""

    max_queued: int = 256  # requests admitted at once; more get 429 + Retry-After
    request_timeout_s: float = 120.0  # per request, from admission to its last token
    body_timeout_s: float = 10.0  # a request body must have arrived whole by then; else 408
    max_body_bytes: int = 1 << 20  # request body size
    max_input_tokens: int | None = None  # input length (None: the encoder's positions); passed to the Engine
    max_request_tokens: int | None = 1 << 16  # decode rows x (input + output tokens) of one request; the Engine's
    api_key: str | None = None  # None: open (serve() reads ENCDEC_FAST_API_KEY when no key is given)
    retry_after_s: int = 1  # the Retry-After header of 429 and 503 answers
    stalled_after_s: float = 30.0  # /health answers 503 "degraded" while an engine turn runs longer

    def __post_init__(self):
        for name in ("max_queued", "max_body_bytes", "retry_after_s"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {v!r}.")
        for name in ("request_timeout_s", "body_timeout_s", "stalled_after_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidInputError(f"{name} must be a positive number of seconds, got {v!r}.")
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
        self.requests = Counter("encdec_fast_requests", "HTTP answers by route and status code: every answer of "
                                "/v1/generate and /v1/completions (499: the client went away), and the errors of "
                                "every other route (route \"other\": a path no route matches)", ["route", "code"],
                                registry=r)
        self.tokens = Counter("encdec_fast_generated_tokens", "tokens generated for answered requests", registry=r)
        Gauge("encdec_fast_queue_depth", "engine requests admitted and not answered yet", registry=r).set_function(
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


UNCOUNTED = "encdec_fast.uncounted"  # a scope key: this answer is not counted by Counted


GENERATING = ("/v1/generate", "/v1/completions")  # routes whose every answer is counted


async def admit(state: ServerState, request, parse, cost=lambda parsed: 1):
    """The parsed body of a request admitted to the queue: state.in_flight is raised by cost(parsed), its
    engine requests, which the caller lowers once it has answered. Else BodyRefused: 503 (loading or
    shutting down), the body's 413/408, 400 for what parse() refuses (InvalidInputError, or its own
    BodyRefused), a bare 499 (the client left), 429 with Retry-After (max_queued engine requests in flight),
    or 400 (more engine requests than max_queued). The whole body, and valid, before it takes a place."""
    limits, engine = state.limits, state.engine
    retry = {"Retry-After": str(limits.retry_after_s)}
    if engine is None or state.shutting_down:
        why = "the model is still loading" if engine is None else "the server is shutting down"
        raise BodyRefused(503, {"error": f"{why}; retry shortly.", "type": "Unavailable"}, retry)
    try:
        parsed = parse(await read_body(request, limits.max_body_bytes, limits.body_timeout_s))
    except InvalidInputError as e:
        raise BodyRefused(400, error_body(e)) from None
    except Disconnected:
        raise BodyRefused(499, None) from None  # nobody to answer; nginx's code for it
    n = cost(parsed)
    if n > limits.max_queued:
        raise BodyRefused(400, {"error": f"this request holds {n} prompts, more than the server's max_queued="
                                         f"{limits.max_queued}; send fewer per request.", "type": "InvalidInputError"},
                          param="prompt")
    if state.in_flight + n > limits.max_queued:
        why = (f"the server has max_queued={limits.max_queued} requests in flight; retry after the Retry-After "
               "seconds, or raise the limit (--max-queued).")
        raise BodyRefused(429, {"error": why, "type": "QueueFull"}, retry)
    state.in_flight += n
    return parsed


class Counted:
    """ASGI middleware: encdec_fast_requests_total{route, code} counts every answer of the generating routes
    (GENERATING) and every error (status >= 400) of the other routes, the API key's 401 and 404/405
    included. route is the path of the app's route that matches (route_of), so its values are bounded. A
    stream counts itself when it ends (by how it ended), and /health's 503s (states) are not counted: both
    mark their scope UNCOUNTED. A route that raises is counted 500 (the app's error handler answers it)."""

    def __init__(self, app, counter, routes):
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500
            raise
        finally:
            if status is not None and not scope.get(UNCOUNTED):
                route = route_of(self.routes, scope)
                if status >= 400 or route in GENERATING:
                    self.counter.labels(route, str(status)).inc()


def route_of(routes, scope) -> str:
    """The path of the app's route matching scope's path (whatever the method), or "other"."""
    return next((r.path for r in routes if r.matches(scope)[0] != Match.NONE), "other")


class Timeout(Exception):
    """A request's time limit (request_timeout_s) passed."""


async def wait_all(request, futures: list, timeout: float) -> list:
    """The futures' results, in order. Cancels every request (freeing their decode slots) if the client
    disconnects (Disconnected), the time limit passes (Timeout), or one fails (its error is raised)."""
    results = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({results, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if results in done and results.exception() is None:
        return results.result()
    for f in futures:
        f.cancel()
    if results in done:
        raise results.exception()
    results.cancel()
    raise Disconnected() if gone in done else Timeout()


async def _until_disconnect(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(StreamingResponse):
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
