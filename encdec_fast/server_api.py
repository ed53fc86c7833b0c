"""The HTTP API's contract: the bodies `encdec-fast serve` takes and answers, as pydantic models (what
/openapi.json describes), the reading and parsing of a /v1/generate body, and the error bodies.

A /v1/generate body is judged in this order, each step before any work of the next:
  1. its size (max_body_bytes: 413) and the time it takes to arrive (body_timeout_s: 408, and the
     connection is closed);
  2. its JSON nesting, by a scan of the bytes before they are parsed (deeper than MAX_JSON_DEPTH: 400);
  3. its JSON, then GenerateRequest: exactly the fields it lists (any other key: 400), each judged by
     encdec_fast/validate.py's Field of the same name, the check generate() and the Engine run, so the
     server, generate() and the Engine refuse the same values with the same messages.
Rules across fields and the model's own limits (vocabulary, positions, decode rows) are the Engine's:
submit() refuses them (400).

Every error is {"error": what went wrong and how to fix it, "type": its name} (ErrorBody): the app's
handlers answer 404, 405 and 500 so, and APIKey (ASGI middleware) 401. The OpenAI routes' errors (every
status, those of the handlers and of APIKey included) take OpenAI's shape instead (OpenAIErrorBody,
openai_body(): {"error": {"message", "type", "param", "code"}}), which OpenAI's clients read: the openai
package raises BadRequestError, AuthenticationError, NotFoundError, ... from the status, and puts
error.message in the exception's text. server_openai_api.py holds those routes' bodies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, WithJsonSchema, create_model
from pydantic import Field as Prop
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from . import validate
from .errors import EncDecError, EngineClosedError, InvalidInputError, RequestCancelledError

MAX_JSON_DEPTH = 32  # a valid body nests 3 levels (the object, bad_words_ids, one bad word)

# generate() arguments a request may carry, with what they do (their types and ranges: validate.py)
GENERATE_ARGS = {
    "max_new_tokens": "tokens to generate at most (eos included)",
    "max_length": "decoder start + generated tokens at most (max_new_tokens is clearer)",
    "min_new_tokens": "eos is banned until this many tokens are generated",
    "min_length": "eos is banned while the sequence (decoder start included) is shorter",
    "do_sample": "sample the tokens instead of greedy or beam search",
    "temperature": "sampling: the logits are divided by it (> 0 when sampling)",
    "top_k": "sampling: keep the k most likely tokens (0: all)",
    "top_p": "sampling: keep the most likely tokens whose probabilities sum to top_p",
    "num_beams": "beam search with this many beams (1: greedy or sampling)",
    "num_return_sequences": "sequences returned per input (at most num_beams); above 1 the answer holds lists",
    "length_penalty": "beam search: a hypothesis scores its log-probability / length ** length_penalty",
    "early_stopping": "beam search: stop once num_beams hypotheses are done (true), by a heuristic (false) or never",
    "repetition_penalty": "logits of tokens already in the sequence are divided (positive) or multiplied by it",
    "no_repeat_ngram_size": "no n-gram of this size appears twice (0: off)",
    "bad_words_ids": "token sequences never generated",
    "eos_token_id": "the token id(s) that end a sequence",
    "pad_token_id": "the token id that pads finished sequences",
    "bos_token_id": "the decoder start when decoder_start_token_id is unset",
    "decoder_start_token_id": "the first token of the decoder",
    "forced_eos_token_id": "the token id(s) forced as the last token at max_length",
}
_NULL = "; null sets it to None, as generate() takes it; absent: the checkpoint's generation_config"


# -- the request ----------------------------------------------------------------------------------
def _field_schema(f: validate.Field) -> dict:
    """The JSON schema of a validate.Field's values (null included: None means unset)."""
    if f.kind == "bool":
        s = {"type": "boolean"}
    else:
        s = {"type": "number" if f.kind == "real" else "integer"}
        if f.lo is not None:
            s["exclusiveMinimum" if f.lo_open else "minimum"] = f.lo
        elif f.magnitude is not None:
            s["minimum"] = -f.magnitude
        hi = min((v for v in (f.hi, f.magnitude) if v is not None), default=None)
        if hi is not None:
            s["maximum"] = hi
        if f.kind == "ids":
            s = {"anyOf": [s, {"type": "array", "items": s, "minItems": 1}]}
    if f.also:
        s = {"anyOf": [s, {"enum": list(f.also)}]}
    return {"anyOf": [s, {"type": "null"}]}


def _integral(v):
    """JSON has one kind of number: 10.0 is the integer 10, as JSON Schema's "integer" has it (lists too)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list) and not all(type(i) is int for i in v):  # a list of ints (most inputs) as it is
        return [_integral(i) for i in v]
    return v


def _checked(name: str, field: validate.Field):
    """A GenerateRequest field judged by validate.number, described by the Field's schema."""
    def check(v):
        return validate.number(_integral(v) if field.kind in ("int", "ids") else v, name, field)

    return Annotated[Any, PlainValidator(check), WithJsonSchema(_field_schema(field))]


def _input(v):
    v = _integral(v)
    if not isinstance(v, str) and not (isinstance(v, list) and all(type(i) is int for i in v)):
        raise InvalidInputError('"input" must be a string or a list of integer token ids (one sequence).')
    return v


def _stream(v):
    if not isinstance(v, bool):
        raise InvalidInputError(f'"stream" must be true or false, got {json.dumps(v)[:40]}.')
    return v


_TOKEN = {"type": "integer", "minimum": 0, "maximum": validate.ID_MAX}
_INPUT = Annotated[Any, PlainValidator(_input), WithJsonSchema(
    {"anyOf": [{"type": "string"}, {"type": "array", "items": _TOKEN, "minItems": 1}]})]
_BAD_WORDS = Annotated[Any, PlainValidator(lambda v: validate.bad_words_ids(_integral(v))), WithJsonSchema(
    {"anyOf": [{"type": "array", "items": {"type": "array", "items": _TOKEN, "minItems": 1}, "minItems": 1},
               {"type": "null"}]})]


def _arg(name: str):
    kind = _BAD_WORDS if name == "bad_words_ids" else _checked(name, validate.GENERATION_FIELDS[name])
    return kind, Prop(None, description=GENERATE_ARGS[name] + _NULL)


GenerateRequest = create_model(
    "GenerateRequest",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [{"input": "a text", "max_new_tokens": 32}]}),
    __doc__="A /v1/generate request: one input and generate()'s arguments (any other key is refused).",
    input=(_INPUT, Prop(description="a text (the checkpoint's tokenizer encodes it) or one sequence of token ids")),
    stream=(Annotated[Any, PlainValidator(_stream), WithJsonSchema({"type": "boolean"})],
            Prop(False, description="answer with server-sent events, one per chunk of new tokens")),
    seed=(_checked("seed", validate.SEED), Prop(None, description="sampling: the seed of this request's draws (the "
                                                "same seed, the same tokens); absent: drawn at random")),
    **{name: _arg(name) for name in GENERATE_ARGS},
)


# -- the answers -------------------------------------------------------------------------------------
class GenerateResponse(BaseModel):
    """A finished request (also the data of a stream's `done` event)."""

    output_ids: list[int] | list[list[int]] = Prop(description="decoder start + generated tokens; one list per "
                                                   "sequence when num_return_sequences > 1")
    text: str | list[str] | None = Prop(description="the decoded output of a text input (null for token ids)")
    num_generated: int = Prop(description="tokens generated, eos included, padding excluded, over all sequences")


class ErrorBody(BaseModel):
    """Every error the server answers."""

    error: str = Prop(description="what went wrong, and how to fix it")
    type: str = Prop(description="the error's name: InvalidInputError, QueueFull, RequestTimeout, ...")


class OpenAIError(BaseModel):
    message: str = Prop(description="what went wrong, and how to fix it")
    type: str = Prop(description="OpenAI's category: invalid_request_error (4xx), requests (429), server_error (5xx)")
    param: str | None = Prop(description="the request field at fault, when one is")
    code: str | None = Prop(description="what went wrong, for programs: model_not_found, invalid_api_key, "
                            "unsupported_parameter, unknown_parameter, invalid_value, or encdec_fast's error name "
                            "in snake case (queue_full, request_timeout, ...)")


class OpenAIErrorBody(BaseModel):
    """Every error of the OpenAI routes, in OpenAI's shape (what OpenAI's clients parse)."""

    error: OpenAIError


class Health(BaseModel):
    status: Literal["ready", "loading", "degraded", "shutting down"]
    stalled_s: float | None = Prop(None, description="degraded: how long the engine's current turn has run")
    reason: str | None = Prop(None, description="degraded: why")


class StreamChunk(BaseModel):
    """A stream's event for the tokens generated since the previous one."""

    token_ids: list[int] | list[list[int]] = Prop(description="the new tokens; one list per sequence when "
                                                  "num_return_sequences > 1")
    text: str | list[str] | None = Prop(None, description="text inputs: the new text (held back while a character "
                                        "is incomplete)")


def _event(name: str, model: str, named: bool = True) -> dict:
    """An SSE event (as OpenAPI 3.2 describes a text/event-stream item) whose data is a JSON `model`."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{model}"}}
    return {"type": "object", "properties": {"event": {"const": name}, "data": data},
            "required": ["event", "data"] if named else ["data"]}


STREAM_EVENT = {
    "description": "With \"stream\": true: server-sent events, one per chunk of new tokens (a StreamChunk), then "
                   "`event: done` with the GenerateResponse, or `event: error` with an ErrorBody.",
    "oneOf": [_event("message", "StreamChunk", named=False), _event("done", "GenerateResponse"),
              _event("error", "ErrorBody")],
}
EXTRA_SCHEMAS = (GenerateRequest, StreamChunk)  # models the app lists in /openapi.json itself (no route declares them)


def _error(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


GENERATE_RESPONSES = {
    200: {"model": GenerateResponse, "description": "the generated tokens (or, with stream, the events)",
          "content": {"text/event-stream": {"schema": STREAM_EVENT}}},
    400: _error("a malformed body, an unknown key, or an argument the model cannot take"),
    401: _error("a missing or wrong API key (when the server has one)"),
    408: _error("the body did not arrive within body_timeout_s"),
    413: _error("the body is longer than max_body_bytes"),
    429: _error("max_queued requests are in flight; retry after Retry-After seconds"),
    500: _error("a server bug"),
    503: _error("the model is loading or the server is shutting down"),
    504: _error("the request did not finish within request_timeout_s"),
}
GENERATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}}


# -- reading and parsing a body ----------------------------------------------------------------------
class BodyRefused(Exception):
    """A request not taken: the HTTP status, its ErrorBody (None: the client went away, nobody to answer) and
    headers; param and code: what an OpenAI error names (the field at fault, a machine-readable code)."""

    def __init__(self, status: int, body: dict | None, headers: dict | None = None, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(body["error"] if body else "the client went away")
        self.status, self.body, self.headers, self.param, self.code = status, body, headers, param, code

    def response(self, openai: bool = False) -> Response:
        """The answer: the ErrorBody, in OpenAI's shape when openai is true; a bare 499 when the client left."""
        if self.body is None:
            return Response(status_code=self.status)
        body = openai_body(self.status, self.body, self.param, self.code) if openai else self.body
        return JSONResponse(body, self.status, self.headers)


class Disconnected(Exception):
    """The client went away."""


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes:
    """The body: 413 past max_bytes (by Content-Length before reading, or while reading), 408 when it has
    not fully arrived after timeout_s; Disconnected when the client goes away meanwhile."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_bytes:
        raise BodyRefused(413, {"error": f"the request body has {int(size)} bytes, more than max_body_bytes="
                                         f"{max_bytes}; send a shorter input, or raise the limit (--max-body-bytes).",
                                "type": "BodyTooLarge"})
    try:
        return await asyncio.wait_for(_chunks(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise BodyRefused(408, {"error": f"the request body did not arrive within body_timeout_s={timeout_s:g} s; send "
                                         "the whole body at once, or raise the limit (--body-timeout).",
                                "type": "BodyTimeout"}, {"Connection": "close"}) from None
    except ClientDisconnect:
        raise Disconnected() from None


async def _chunks(request, max_bytes: int) -> bytes:
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise BodyRefused(413, {"error": f"the request body is longer than max_body_bytes={max_bytes}; send a "
                                             "shorter input, or raise the limit (--max-body-bytes).",
                                    "type": "BodyTooLarge"})
        chunks.append(chunk)
    return b"".join(chunks)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string (the unrolled loop: linear time)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENERS = frozenset(b"[{")


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON in body nests arrays/objects deeper than limit (json.loads recurses once per level,
    and Python's stack ends near 1000). Bytes in strings do not count. Two byte counts decide almost
    every body; only one with more than `limit` brackets is scanned."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for c in _STRING.sub(b'""', body).translate(None, _NOT_BRACKETS):
        depth += 1 if c in _OPENERS else -1
        if depth > limit:
            return True
    return False


def parse_generate(body: bytes):
    """-> (input, stream, generate kwargs) of a /v1/generate body; InvalidInputError (400) when malformed."""
    if too_deep(body):
        raise InvalidInputError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels; a /v1/generate body "
                                "needs 3 (the object, bad_words_ids and its sequences).")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"the request body is not valid JSON ({e}); send an object like "
                                '{"input": "some text", "max_new_tokens": 32}.') from None
    if not isinstance(obj, dict) or "input" not in obj:
        raise InvalidInputError('the request body must be a JSON object with an "input" field (a string, or a list '
                                'of token ids), plus generate() arguments, e.g. {"input": [101, 2023, 102]}.')
    try:
        kwargs = GenerateRequest.model_validate(obj).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise _request_error(e) from None
    return kwargs.pop("input"), kwargs.pop("stream", False), kwargs


def _request_error(e: ValidationError) -> EncDecError:
    errors = e.errors()
    unknown = [str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden"]
    if unknown:
        names = ", ".join(repr(k) if len(k) <= 40 else repr(k[:40]) + "..." for k in unknown[:8])
        more = ", ..." if len(unknown) > 8 else ""
        return InvalidInputError(f"unknown argument(s) {names}{more}: a /v1/generate body takes input, stream, seed "
                                 f"and the generate() arguments {', '.join(GENERATE_ARGS)} (see /openapi.json); check "
                                 "the spelling.")
    for err in errors:
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, EncDecError):  # validate.py's own message
            return cause
    err = errors[0]
    return InvalidInputError(f"invalid request body at {'.'.join(map(str, err['loc'])) or 'the top'}: {err['msg']}.")


# -- errors ------------------------------------------------------------------------------------------
OPENAI_ROUTES = ("/v1/completions", "/v1/models")  # and /v1/models/{model}


def is_openai(path: str) -> bool:
    """Whether path is an OpenAI route, whose errors take OpenAI's shape."""
    return path in OPENAI_ROUTES or path.startswith("/v1/models/")


def openai_body(status: int, body: dict, param: str | None = None, code: str | None = None) -> dict:
    """An ErrorBody in OpenAI's shape: the message as it is; the type by status, as OpenAI types its errors
    (server_error for 5xx, requests for 429, invalid_request_error otherwise); code as given, else
    invalid_api_key for a 401 (OpenAI's), else the error's name in snake case (QueueFull: queue_full)."""
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    if code is None:
        code = "invalid_api_key" if status == 401 else re.sub(r"(?<!^)(?=[A-Z])", "_", body["type"]).lower()
    return {"error": {"message": body["error"], "type": kind, "param": param, "code": code}}


def status_of(exc: BaseException, refused: bool = False) -> int:
    """refused: raised when the request was submitted (its input or arguments), not while it ran."""
    if isinstance(exc, RequestCancelledError):
        return 504  # only the server cancels a request whose client is still there: its time limit
    if isinstance(exc, EngineClosedError):
        return 503
    if isinstance(exc, EncDecError) or (refused and isinstance(exc, (ValueError, TypeError))):
        return 400
    return 500


def error_body(exc: BaseException) -> dict:
    return {"error": str(exc), "type": type(exc).__name__}


def refused_body(exc: BaseException) -> dict:
    """The answer to a request refused when submitted: an encdec_fast error as it is; a TypeError or
    ValueError from deeper down (an argument of the wrong JSON type) named as the request's fault."""
    if isinstance(exc, EncDecError):
        return error_body(exc)
    return {"error": f"invalid generate() arguments ({type(exc).__name__}: {exc}); check each argument's type "
                     "(numbers for lengths and probabilities, lists of ints for token ids).",
            "type": "InvalidInputError"}


def timeout_body(request_timeout_s: float) -> dict:
    return {"error": f"the request did not finish within request_timeout_s={request_timeout_s:g} s and was "
                     "cancelled; ask for fewer tokens, or raise the limit (--request-timeout).",
            "type": "RequestTimeout"}


async def http_error(request, exc: HTTPException):
    """404, 405 (and any other HTTPException) as an ErrorBody."""
    code = exc.status_code
    if code == 404:
        why = (f"there is no route {request.url.path}; the routes are POST /v1/generate, POST /v1/completions, GET "
               "/v1/models, GET /health, GET /metrics and GET /openapi.json.")
    elif code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        why = f"{request.url.path} does not take {request.method}; use {allowed}."
    else:
        why = str(exc.detail)
    kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(code) or HTTPStatus(code).phrase.replace(" ", "")
    return _shaped(request.url.path, {"error": why, "type": kind}, code, exc.headers)


async def internal_error(request, exc: Exception):
    """A bug: answered as an ErrorBody (Starlette still logs the traceback), and the connection closed."""
    return _shaped(request.url.path, {"error": f"internal server error ({type(exc).__name__}: {exc}); this is a bug in "
                                               "encdec_fast: please report it with the request that caused it.",
                                      "type": "InternalServerError"}, 500, {"Connection": "close"})


def _shaped(path: str, body: dict, status: int, headers=None) -> JSONResponse:
    """An ErrorBody answer, in OpenAI's shape on the OpenAI routes."""
    return JSONResponse(openai_body(status, body) if is_openai(path) else body, status, headers)


class APIKey:
    """ASGI middleware: every HTTP route but /health needs the key (Authorization: Bearer KEY, as OpenAI's
    clients send it, or X-API-Key: KEY), compared in constant time."""

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
        error = {"error": why, "type": "Unauthorized"}
        body = json.dumps(openai_body(401, error) if is_openai(scope["path"]) else error).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
