"""OpenAI's completions API, the contract: the bodies of POST /v1/completions and GET /v1/models as
pydantic models (what /openapi.json describes), and the reading of a completions body into Engine
requests (parse_completion -> a CompletionPlan). server_openai.py serves them.

A /v1/completions body is judged as a /v1/generate body is (server_api.py: size, time, JSON depth, JSON),
then by CompletionRequest: exactly OpenAI's fields (any other key: 400 unknown_parameter), each with
OpenAI's type and range; then `model` against the served name (404 model_not_found); then the fields the
engine cannot honour with the value sent (400 unsupported_parameter, naming them all). Errors are
raised as BodyRefused with OpenAI's param and code; the routes answer them in OpenAI's shape.

How the fields become generate() arguments (each prompt is one Engine request):
  max_tokens         max_new_tokens (OpenAI's default 16; null: 16)
  temperature        0: greedy (do_sample=False); > 0: do_sample=True with that temperature (default 1)
  top_p              top_p when sampling (default 1: off); top_k=0, as OpenAI samples from every token
  n                  num_return_sequences when sampling; greedy runs once and answers n identical
                     choices, as OpenAI does for n > 1 at temperature 0 (with no work wasted)
  seed               seed, 0 to 2**64 - 1 as torch.Generator takes it (the same seed, the same tokens)
  stop               the Engine's stop= (up to 4 strings); the text is cut before the first one
  num_beams=1        always: OpenAI's API has no beam search (the checkpoint may set beams)
Every other generation setting is the checkpoint's generation_config, as generate() applies it. Accepted
and ignored: user, echo=false, logprobs=null, best_of equal to n, suffix empty, presence_penalty and
frequency_penalty 0, logit_bias empty, stream_options.include_obfuscation. Refused otherwise (400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, WithJsonSchema, create_model
from pydantic import Field as Prop

from . import validate
from .errors import EncDecError, InvalidInputError
from .server_api import _TOKEN, MAX_JSON_DEPTH, BodyRefused, OpenAIErrorBody, _checked, _integral, too_deep

DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_N = 128  # OpenAI's
MAX_STOP = 4  # OpenAI's

_PENALTIES = ("OpenAI's additive penalties have no transformers counterpart; POST /v1/generate takes "
              "repetition_penalty and no_repeat_ngram_size")
# fields the engine cannot honour: harmless(value, n) says when a value is accepted (and ignored)
UNSUPPORTED = {
    "echo": (lambda v, n: not v, ("an encoder-decoder model's output does not continue its prompt, so there is no "
                                  "prompt-plus-completion text to echo")),
    "logprobs": (lambda v, n: v is None, ("the engine returns tokens, not their log-probabilities; "
                                          "model.generate(output_scores=True) gives scores")),
    "best_of": (lambda v, n: v is None or v == n, ("best_of > n ranks sequences by log-probability, which the "
                                                   "engine does not return; ask for n choices instead")),
    "suffix": (lambda v, n: not v, "the engine does not insert text before a suffix"),
    "presence_penalty": (lambda v, n: not v, _PENALTIES),
    "frequency_penalty": (lambda v, n: not v, _PENALTIES),
    "logit_bias": (lambda v, n: not v, ("the engine does not bias logits; POST /v1/generate takes bad_words_ids to "
                                        "ban tokens")),
}


# -- the request ----------------------------------------------------------------------------------
def _prompt(v) -> list:
    """-> the prompts: each a text or a list of token ids."""
    v = _integral(v)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(type(i) is int for i in v):
            return [v]
        if all(isinstance(p, str) for p in v):
            return list(v)
        if all(isinstance(p, list) and p and all(type(i) is int for i in p) for p in v):
            return [list(p) for p in v]
    raise InvalidInputError('"prompt" must be a string, a list of strings, a list of token ids, or a list of lists of '
                            "token ids (none of them empty).")


def _stop(v):
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP or not all(isinstance(s, str) and s for s in items):
        raise InvalidInputError(f'"stop" must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, '
                                f"got {json.dumps(v)[:60]}.")
    return tuple(items)


def _stream_options(v):
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) - {"include_usage", "include_obfuscation"} or \
            not all(isinstance(x, bool) for x in v.values()):
        raise InvalidInputError('"stream_options" must be an object with the booleans "include_usage" (and '
                                f'"include_obfuscation"), got {json.dumps(v)[:60]}.')
    return v


def _typed(name: str, types: tuple, what: str, schema: dict):
    """A field of exactly these JSON types (no coercion) or null."""
    def check(v):
        if v is not None and (not isinstance(v, types) or (bool not in types and isinstance(v, bool))):
            raise InvalidInputError(f'"{name}" must be {what} or null, got {json.dumps(v)[:60]}.')
        return v

    return Annotated[Any, PlainValidator(check), WithJsonSchema({"anyOf": [schema, {"type": "null"}]})]


_STRING = {"type": "string", "minLength": 1}
_PROMPT = Annotated[Any, PlainValidator(_prompt), WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {"type": "array", "items": _TOKEN, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": _TOKEN, "minItems": 1}, "minItems": 1}]})]
_STOP = Annotated[Any, PlainValidator(_stop), WithJsonSchema({"anyOf": [
    _STRING, {"type": "array", "items": _STRING, "maxItems": MAX_STOP}, {"type": "null"}]})]
_STREAM_OPTIONS = Annotated[Any, PlainValidator(_stream_options), WithJsonSchema({"anyOf": [
    {"type": "object", "properties": {"include_usage": {"type": "boolean"}, "include_obfuscation": {"type": "boolean"}},
     "additionalProperties": False}, {"type": "null"}]})]
_BIAS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100}}


def _model_name(v):
    if not isinstance(v, str):
        raise InvalidInputError(f'"model" must be a string (GET /v1/models lists the served one), got '
                                f"{json.dumps(v)[:60]}.")
    return v


CompletionRequest = create_model(
    "CompletionRequest",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "the served name", "prompt": "a "
                                                                           "text", "max_tokens": 32}]}),
    __doc__="A /v1/completions request: OpenAI's fields (any other key is refused).",
    model=(Annotated[Any, PlainValidator(_model_name), WithJsonSchema({"type": "string"})],
           Prop(description="the served model's name (GET /v1/models)")),
    prompt=(_PROMPT, Prop(description="a text, a list of texts, a list of token ids, or a list of lists of them: one "
                          "Engine request each")),
    max_tokens=(_checked("max_tokens", validate.GENERATION_FIELDS["max_new_tokens"]),
                Prop(None, description=f"tokens to generate at most (max_new_tokens); default {DEFAULT_MAX_TOKENS}")),
    temperature=(_checked("temperature", validate.Field("real", 0, 2)),
                 Prop(None, description="0: greedy; > 0: sampling at that temperature; default 1")),
    top_p=(_checked("top_p", validate.GENERATION_FIELDS["top_p"]), Prop(None, description="sampling: nucleus mass; "
                                                                        "default 1 (off)")),
    n=(_checked("n", validate.Field("int", 1, MAX_N)), Prop(None, description="choices per prompt; default 1")),
    stream=(_typed("stream", (bool,), "true or false", {"type": "boolean"}),
            Prop(None, description="answer with OpenAI's server-sent chunks, then data: [DONE]")),
    stream_options=(_STREAM_OPTIONS, Prop(None, description="with stream: include_usage adds a last chunk with usage")),
    stop=(_STOP, Prop(None, description=f"up to {MAX_STOP} strings; a choice ends before the first one it generates")),
    seed=(_checked("seed", validate.SEED), Prop(None, description="sampling: the same seed, the same tokens")),
    echo=(_typed("echo", (bool,), "true or false", {"type": "boolean"}), Prop(None, description="only false")),
    logprobs=(_checked("logprobs", validate.Field("int", 0, 5)), Prop(None, description="only null")),
    best_of=(_checked("best_of", validate.Field("int", 1, 20)), Prop(None, description="only null or n")),
    suffix=(_typed("suffix", (str,), "a string", {"type": "string"}), Prop(None, description="only null or empty")),
    presence_penalty=(_checked("presence_penalty", validate.Field("real", -2, 2)), Prop(None, description="only 0")),
    frequency_penalty=(_checked("frequency_penalty", validate.Field("real", -2, 2)), Prop(None, description="only 0")),
    logit_bias=(_typed("logit_bias", (dict,), "an object", _BIAS), Prop(None, description="only empty")),
    user=(_typed("user", (str,), "a string", {"type": "string"}), Prop(None, description="accepted and ignored")),
)


# -- the answers -------------------------------------------------------------------------------------
class CompletionChoice(BaseModel):
    text: str = Prop(description="the generated text (or, in a stream chunk, its new part), without a stop string")
    index: int = Prop(description="prompt index x n + sequence index")
    logprobs: None = Prop(None, description="always null (logprobs are not served)")
    finish_reason: Literal["stop", "length"] | None = Prop(description="stop: eos or a stop string; length: "
                                                           "max_tokens reached; null in a stream until the choice ends")


class CompletionUsage(BaseModel):
    prompt_tokens: int = Prop(description="encoder input tokens, over the prompts (once each, whatever n)")
    completion_tokens: int = Prop(description="tokens generated, over the choices (eos included)")
    total_tokens: int


class Completion(BaseModel):
    """A completion, and also each chunk of a stream (the text new since the previous chunk)."""

    id: str
    object: Literal["text_completion"]
    created: int = Prop(description="Unix time")
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = Prop(None, description="the answer's usage; in a stream, null but in the last "
                                         "chunk with stream_options.include_usage (whose choices are empty)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


EXTRA_SCHEMAS = (CompletionRequest,)  # listed in /openapi.json by the app (no route declares it)


def name_the_model(schema: dict, name: str):
    """Names the served model in the schema of `model`, so /openapi.json says which value is taken."""
    schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"] = {
        "type": "string", "enum": [name], "description": "the served model's name (GET /v1/models lists it)"}


# -- reading a body -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionPlan:
    """A completions request, read: its prompts, each an Engine request with kwargs; n choices per prompt,
    copies of each sequence (n with greedy, else 1); what ends a choice (max_tokens, stop); how to answer."""

    model: str
    prompts: list
    kwargs: dict
    n: int
    copies: int
    max_tokens: int
    stop: tuple
    stream: bool
    include_usage: bool


def _refused(message: str, param: str | None, code: str, status: int = 400) -> BodyRefused:
    kind = "ModelNotFound" if status == 404 else "InvalidInputError"
    return BodyRefused(status, {"error": message, "type": kind}, param=param, code=code)


def parse_completion(body: bytes, served: str) -> CompletionPlan:
    """-> the CompletionPlan of a /v1/completions body; BodyRefused (400, or 404 for another model) else."""
    if too_deep(body):
        raise _refused(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels; a /v1/completions body needs "
                       "3 (the object, prompt and its token ids).", None, "invalid_json")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _refused(f"the request body is not valid JSON ({e}); send an object like "
                       '{"model": "...", "prompt": "some text", "max_tokens": 32}.', None, "invalid_json") from None
    if not isinstance(obj, dict):
        raise _refused('the request body must be a JSON object with "model" and "prompt", e.g. {"model": "...", '
                       '"prompt": "some text"}.', None, "invalid_json")
    try:
        req = CompletionRequest.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.model != served:
        raise _refused(f"The model `{req.model}` does not exist: this server serves `{served}` (GET /v1/models lists "
                       "it).", "model", "model_not_found", 404)
    n = req.n or 1
    unsupported = [name for name, (harmless, _) in UNSUPPORTED.items() if not harmless(getattr(req, name), n)]
    if unsupported:
        why = "; ".join(f"{name}={json.dumps(getattr(req, name))[:40]}: {UNSUPPORTED[name][1]}" for name in unsupported)
        raise _refused(f"unsupported parameter(s) {', '.join(unsupported)} ({why}).", unsupported[0],
                       "unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise _refused('"stream_options" is only allowed when "stream" is true.', "stream_options", "invalid_value")
    return _plan(req, served, n)


def _plan(req, served: str, n: int) -> CompletionPlan:
    """The generate() arguments of a valid request (see the module docstring)."""
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    temperature = req.temperature if req.temperature is not None else 1.0
    kwargs = {"max_new_tokens": max_tokens, "num_beams": 1, "num_return_sequences": 1}
    if temperature == 0:
        kwargs["do_sample"], copies = False, n
    else:
        top_p = req.top_p if req.top_p is not None else 1.0
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
        copies = 1
    if req.seed is not None:
        kwargs["seed"] = req.seed
    if req.stop:
        kwargs["stop"] = list(req.stop)
    include_usage = bool(req.stream_options and req.stream_options.get("include_usage"))
    return CompletionPlan(model=served, prompts=req.prompt, kwargs=kwargs, n=n, copies=copies, max_tokens=max_tokens,
                          stop=req.stop or (), stream=bool(req.stream), include_usage=include_usage)


def _validation_error(e: ValidationError) -> BodyRefused:
    errors = e.errors()
    unknown = [str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden"]
    if unknown:
        names = ", ".join(repr(k) if len(k) <= 40 else repr(k[:40]) + "..." for k in unknown[:8])
        more = ", ..." if len(unknown) > 8 else ""
        return _refused(f"unknown parameter(s) {names}{more}: /v1/completions takes OpenAI's fields "
                        f"{', '.join(CompletionRequest.model_fields)}; encdec_fast's other generation settings "
                        "(num_beams, top_k, repetition_penalty, ...) are POST /v1/generate's.", unknown[0][:40],
                        "unknown_parameter")
    missing = [str(err["loc"][0]) for err in errors if err["type"] == "missing"]
    if missing:
        return _refused(f"missing required parameter(s) {', '.join(missing)}: a /v1/completions body needs "
                        '"model" (GET /v1/models) and "prompt".', missing[0], "missing_required_parameter")
    err = errors[0]
    cause = err.get("ctx", {}).get("error")
    param = str(err["loc"][0]) if err["loc"] else None
    message = str(cause) if isinstance(cause, EncDecError) else f"invalid {param or 'body'}: {err['msg']}."
    return _refused(message, param, "invalid_value")


# -- the routes' documented answers ------------------------------------------------------------------
def openai_errors(*codes: int) -> dict:
    """OpenAPI responses: these statuses answer an OpenAIErrorBody."""
    why = {400: "a malformed body, an unknown or unsupported parameter, or a value the model cannot take",
           401: "a missing or wrong API key (when the server has one)", 404: "another model than the served one",
           408: "the body did not arrive within body_timeout_s", 413: "the body is longer than max_body_bytes",
           429: "max_queued requests are in flight; retry after Retry-After seconds", 500: "a server bug",
           503: "the model is loading or the server is shutting down",
           504: "the request did not finish within request_timeout_s"}
    return {code: {"model": OpenAIErrorBody, "description": why[code]} for code in codes}


_CHUNK = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": "#/components/schemas/"
                                                                                     "Completion"}}
STREAM_EVENT = {
    "description": "With \"stream\": true: server-sent events whose data is a Completion chunk (each choice's new "
                   "text; "
                   "its last chunk has its finish_reason; with stream_options.include_usage a last chunk with usage), "
                   "then the data [DONE]. An error once the stream has begun is data {\"error\": {...}} (an "
                   "OpenAIErrorBody), then [DONE].",
    "type": "object", "required": ["data"],
    "properties": {"data": {"anyOf": [_CHUNK, {"const": "[DONE]"}, {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"$ref": "#/components/schemas/OpenAIErrorBody"}}]}},
}
COMPLETION_RESPONSES = {
    200: {"model": Completion, "description": "the completion (or, with stream, OpenAI's server-sent chunks)",
          "content": {"text/event-stream": {"schema": STREAM_EVENT}}},
    **openai_errors(400, 401, 404, 408, 413, 429, 500, 503, 504),
}
COMPLETION_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/CompletionRequest"}}}}}
