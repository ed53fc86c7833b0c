"""OpenAI's completions API over the Engine: POST /v1/completions, GET /v1/models and GET
/v1/models/{model} (their bodies, and how OpenAI's fields become generate() arguments:
server_openai_api.py).

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.completions.create(model=NAME, prompt=["a text", "another"], max_tokens=32, n=2, stop=["\\n"])

A completions request is admitted as a /v1/generate request is (server.admit: 503 while loading, the
body's size and time limits, 400 for what it refuses, max_queued with one place per prompt, the API
key), then each prompt is one Engine request; request_timeout_s, a client that goes away, and the
metrics (encdec_fast_requests_total{route="/v1/completions"}, tokens, latency, time to first chunk)
work as they do for /v1/generate. Its errors, at every step, take OpenAI's shape.

The text of a choice: its sequence's tokens up to the first eos, decoded whole with the Engine's decoder
tokenizer (special tokens skipped), cut before the first stop string it holds (_Text). The Engine stops
the sequence at the token that completes a stop string (stop=, as model.generate(stop_strings=...));
the cut also catches a stop string the token-level check cannot see (one inside a token). A stream sends each choice's
new
text as it comes, holding back text that could begin a stop string (or ends in an incomplete
character) until the next tokens decide it; the last chunk of a choice carries its finish_reason; once
a stop string in the text has ended a prompt's last running choice, its Engine request is cancelled
(its decode rows freed). Then, with stream_options.include_usage, a chunk with the usage and no
choices, and `data: [DONE]`. An error once the stream has begun (the time limit, a request failing in
the engine) is `data: {"error": {...}}`, which the openai package raises as APIError, then
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .errors import InvalidInputError
from .server_api import BodyRefused, Disconnected, error_body, openai_body, refused_body, status_of, timeout_body
from .server_core import UNCOUNTED, EventStream, Timeout, admit, wait_all
from .server_openai_api import (
    COMPLETION_BODY,
    COMPLETION_RESPONSES,
    EXTRA_SCHEMAS,
    CompletionPlan,
    ModelCard,
    ModelList,
    name_the_model,
    openai_errors,
    parse_completion,
)

__all__ = ["EXTRA_SCHEMAS", "add_routes", "name_the_model"]
ROUTE = "/v1/completions"
_END = object()


def add_routes(app, state, name: str):
    """The OpenAI routes of the app over state (server.ServerState), serving the model as `name`."""
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "encdec_fast"}

    @app.get("/v1/models", response_model=ModelList, responses=openai_errors(401, 500))
    async def models():
        """OpenAI's model list: the served model."""
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=openai_errors(401, 404, 500))
    async def model_card(model: str):
        """OpenAI's model card of the served model; any other name is 404 model_not_found."""
        if model != name:
            body = {"error": f"The model `{model}` does not exist: this server serves `{name}`.",
                    "type": "ModelNotFound"}
            return JSONResponse(openai_body(404, body, "model", "model_not_found"), 404)
        return card

    @app.post(ROUTE, response_model=None, responses=COMPLETION_RESPONSES, openapi_extra=COMPLETION_BODY)
    async def completions(request: Request):
        """OpenAI's completions (see CompletionRequest; with "stream": true the answer is server-sent chunks)."""
        try:
            plan = await admit(state, request, lambda body: parse_completion(body, name), lambda p: len(p.prompts))
        except BodyRefused as e:
            return e.response(openai=True)
        streaming = False
        try:
            if not plan.stream:
                return await _complete(request, state, plan)
            response = _open_stream(request, state, plan)
            streaming = isinstance(response, EventStream)  # it answers, counts and releases its place from here on
            return response
        finally:
            if not streaming:
                state.in_flight -= len(plan.prompts)


# -- one sequence's text ------------------------------------------------------------------------------
def _held(text: str, stops: tuple) -> int:
    """The length of the longest end of text that begins a stop string (the next tokens may complete it)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Text:
    """One sequence's completion as its tokens arrive (a stream's chunks, or a whole row at once); see the
    module docstring. finish_reason: "stop" (eos, or a stop string in the text), "length" (max_tokens
    generated), None while it runs. sent: the text answered so far (all of it once finished)."""

    def __init__(self, detokenize, plan: CompletionPlan, eos, pad):
        self.detokenize, self.stop, self.max_tokens = detokenize, plan.stop, plan.max_tokens
        self.eos, self.pad = frozenset(eos or ()), pad
        self.tokens: list[int] = []
        self.text = self.sent = ""
        self.finish_reason = None
        self.eos_seen = self.cut = False  # cut: ended by a stop string found in the text

    def feed(self, new: list[int]) -> tuple[str, str | None]:
        """New tokens -> (the text to send now, the finish_reason if they end the choice)."""
        if self.finish_reason is not None:
            return "", None  # a finished row's padding
        for t in new:
            self.tokens.append(t)
            if t in self.eos:
                self.eos_seen = True
                break
        self.text = text = self.detokenize(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.cut = True
            return self._finish(text[:cut], "stop")
        if self.eos_seen:
            return self._finish(text, "stop")
        if text.endswith("\ufffd"):  # an incomplete character: the next token completes it
            return "", None
        return self._send(text[:len(text) - _held(text, self.stop)]), None

    def end(self) -> tuple[str, str | None]:
        """The request has finished: what is left to send, and the finish_reason (if not given yet)."""
        if self.finish_reason is not None:
            return "", None
        return self._finish(self.text, "length" if self.count >= self.max_tokens else "stop")

    def _finish(self, text: str, reason: str):
        self.finish_reason = reason
        return self._send(text), reason

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer rewrote text already sent: nothing to add
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def count(self) -> int:
        """Tokens generated, eos included; without the padding the engine feeds a row it stopped at a stop
        string while its other sequences run (when the pad token is no eos)."""
        n = len(self.tokens)
        if not self.eos_seen and self.stop and self.pad is not None and self.pad not in self.eos:
            while n and self.tokens[n - 1] == self.pad:
                n -= 1
        return n


class _Prompt:
    """One prompt's choices: a _Text per Engine sequence, each answering `copies` choices (n identical ones
    for greedy), indexed prompt index x n + sequence index, as OpenAI orders them."""

    def __init__(self, index: int, plan: CompletionPlan, detokenize, request):
        self.first, self.copies = index * plan.n, plan.copies
        self.texts = [_Text(detokenize, plan, request.params.eos, request.params.pad)
                      for _ in range(plan.n // plan.copies)]
        self.prompt_tokens = len(request.ids)

    def feed(self, chunk) -> list[tuple[int, str, str | None]]:
        """A stream chunk -> (choice index, new text, finish_reason) of each choice with news."""
        rows = chunk if len(self.texts) > 1 else [chunk]
        return self._news([t.feed(row) for t, row in zip(self.texts, rows)])

    def end(self) -> list[tuple[int, str, str | None]]:
        return self._news([t.end() for t in self.texts])

    def whole(self, output_ids) -> list[dict]:
        """A finished request's output_ids -> its choices."""
        for t, row in zip(self.texts, output_ids if len(self.texts) > 1 else [output_ids]):
            t.feed(row[1:])  # past the decoder start
            t.end()
        return [_choice(self.first + r * self.copies + c, t.sent, t.finish_reason)
                for r, t in enumerate(self.texts) for c in range(self.copies)]

    def _news(self, updates) -> list:
        return [(self.first + r * self.copies + c, text, reason) for r, (text, reason) in enumerate(updates)
                if text or reason for c in range(self.copies)]

    @property
    def cut(self) -> bool:
        """Every choice has ended, one at a stop string in its text: the Engine may still run the request
        (its token-level check can miss what the text shows), though nothing of it will be answered."""
        return all(t.finish_reason is not None for t in self.texts) and any(t.cut for t in self.texts)

    @property
    def generated(self) -> int:
        """Tokens the engine generated for the answered text."""
        return sum(t.count for t in self.texts)


def _choice(index: int, text: str, reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}


def _usage(prompts: list[_Prompt]) -> dict:
    """OpenAI's usage: each prompt's tokens once; the tokens of every choice (greedy copies included)."""
    prompt = sum(p.prompt_tokens for p in prompts)
    completion = sum(p.generated * p.copies for p in prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(plan: CompletionPlan) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": plan.model}


def _error(status: int, body: dict) -> JSONResponse:
    return JSONResponse(openai_body(status, body), status)


def _refusal(exc: BaseException) -> JSONResponse:
    """The answer to a prompt refused when submitted (its input or arguments, or a closed engine)."""
    return _error(status_of(exc, refused=True), refused_body(exc))


# -- answering ----------------------------------------------------------------------------------------
def _start(engine, plan: CompletionPlan, stream: bool) -> list:
    """Every prompt's request, in order: TokenStreams (stream) or futures. A refusal cancels the ones started
    and is raised (InvalidInputError when the engine has no tokenizer to answer text with)."""
    try:
        engine.detokenize([])
    except InvalidInputError as e:
        raise InvalidInputError(f"the completions API answers text, which needs the checkpoint's tokenizer: {e}"
                                ) from None
    return _start_all(engine, plan.prompts, plan.kwargs, stream)


def _start_all(engine, prompts: list, kwargs: dict, stream: bool) -> list:
    started = []
    try:
        for p in prompts:
            if stream:
                started.append(engine.stream(p, **kwargs))
                continue
            started.append(engine.submit(p, **kwargs))
            if started[-1].done() and started[-1].exception() is not None:  # refused when submitted
                raise started[-1].exception()
    except BaseException:
        for s in started:
            s.close() if stream else s.cancel()
        raise
    return started


async def _complete(request, state, plan: CompletionPlan):
    """A completion answered whole: every prompt submitted, waited for (request_timeout_s, a client that
    leaves), and its choices made."""
    engine, limits, t0 = state.engine, state.limits, time.perf_counter()
    try:
        futures = _start(engine, plan, stream=False)
    except Exception as e:  # noqa: BLE001  a bad prompt or argument, or a closed engine
        return _refusal(e)
    try:
        results = await wait_all(request, futures, limits.request_timeout_s)
    except Timeout:
        return _error(504, timeout_body(limits.request_timeout_s))
    except Disconnected:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001  a request failed in the engine
        return _error(status_of(e), error_body(e))
    prompts = [_Prompt(i, plan, engine.detokenize, f.request) for i, f in enumerate(futures)]
    choices = [c for p, res in zip(prompts, results) for c in p.whole(res.output_ids)]
    state.metrics.latency.observe(time.perf_counter() - t0)
    state.metrics.tokens.inc(sum(p.generated for p in prompts))
    return JSONResponse({**_head(plan), "choices": choices, "usage": _usage(prompts)})


def _open_stream(request, state, plan: CompletionPlan) -> Response:
    """The streamed answer: every prompt's TokenStream opened (or the refusal of the first bad one)."""
    try:
        streams = _start(state.engine, plan, stream=True)
    except Exception as e:  # noqa: BLE001  a bad prompt or argument, or a closed engine
        return _refusal(e)
    streamed = _CompletionStream(state, plan, streams, state.engine.detokenize)
    request.scope[UNCOUNTED] = True  # the stream counts itself when it ends
    return EventStream(streamed.events(), streamed.close, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache"})


async def _pump(i: int, stream, queue: asyncio.Queue):
    """Stream i's chunks into the queue as (i, chunk), then (i, _END), or (i, its error)."""
    try:
        async for chunk in stream:
            queue.put_nowait((i, chunk))
        queue.put_nowait((i, _END))
    except Exception as e:  # noqa: BLE001  the request failed in the engine
        queue.put_nowait((i, e))


def _data(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


class _CompletionStream:
    """One streamed completions request: OpenAI's chunks from its prompts' TokenStreams, merged as they
    come, and the bookkeeping when its response ends (see the module docstring)."""

    def __init__(self, state, plan: CompletionPlan, streams: list, detokenize):
        self.state, self.plan, self.streams, self.t0 = state, plan, streams, time.perf_counter()
        self.prompts = [_Prompt(i, plan, detokenize, s.future.request) for i, s in enumerate(streams)]
        self.head = _head(plan)
        self.status = "499"  # until it ends otherwise: the client went away
        self.closed = False

    def _chunk(self, choices: list, usage=None) -> bytes:
        extra = {"usage": usage} if self.plan.include_usage else {}
        return _data({**self.head, "choices": choices, **extra})

    def _failed(self, status: int, body: dict):
        """The error's events, after every prompt's request is cancelled (before the client hears of the error: it
        may send its next request at once)."""
        self.status = str(status)
        for s in self.streams:
            s.close()  # no-op once finished
        return [_data(openai_body(status, body)), DONE]

    async def events(self):
        """The chunks; the request is cancelled (in close()) when the client goes away or its time limit passes."""
        limits, metrics = self.state.limits, self.state.metrics
        deadline, first, left = self.t0 + limits.request_timeout_s, True, len(self.streams)
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(i, s, queue)) for i, s in enumerate(self.streams)]
        try:
            while left:
                try:
                    i, item = await asyncio.wait_for(queue.get(), max(deadline - time.perf_counter(), 0))
                except asyncio.TimeoutError:
                    for event in self._failed(504, timeout_body(limits.request_timeout_s)):
                        yield event
                    return
                if isinstance(item, BaseException):
                    for event in self._failed(status_of(item), error_body(item)):
                        yield event
                    return
                prompt = self.prompts[i]
                if item is _END:
                    left -= 1
                    news = prompt.end()
                else:
                    if first:
                        metrics.first_token.observe(time.perf_counter() - self.t0)
                        first = False
                    news = prompt.feed(item)
                    if prompt.cut:
                        self.streams[i].close()  # free its rows (a no-op once it has finished)
                for index, text, reason in news:
                    yield self._chunk([_choice(index, text, reason)])
        finally:
            for p in pumps:
                p.cancel()
        metrics.latency.observe(time.perf_counter() - self.t0)
        metrics.tokens.inc(sum(p.generated for p in self.prompts))
        self.status = "200"
        if self.plan.include_usage:
            yield self._chunk([], _usage(self.prompts))
        yield DONE

    def close(self):
        """Once the response has ended, however it ended (even before its first event)."""
        if self.closed:
            return
        self.closed = True
        for s in self.streams:
            s.close()  # no-op once finished
        self.state.in_flight -= len(self.streams)
        self.state.metrics.requests.labels(ROUTE, self.status).inc()
