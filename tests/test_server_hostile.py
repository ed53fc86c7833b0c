"""The HTTP server against attackers and buggy clients (issue 22), with uvicorn on 127.0.0.1: bodies that
never finish hold no capacity (408 after body_timeout_s) and clients that leave log no traceback;
integers past int64, unknown keys, deep JSON and out-of-vocabulary special ids are 400 with a JSON error
(through model.generate and the Engine too); 404/405/401 answer the documented error body and are
counted; /openapi.json describes the bodies; /health says "degraded" while an engine turn is stuck.
Then schemathesis against the served schema, and a bounded property-based fuzz of /v1/generate."""

import json
import socket
import threading

import pytest
import torch

import encdec_fast
from encdec_fast import InvalidInputError, UnsupportedArgumentError

httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
pytest.importorskip("uvicorn", reason="the test extra installs uvicorn")
from serving import (  # noqa: E402
    VOCAB,
    checkpoint_with_tokenizer,
    requests_total,
    running,
    server_errors,
    solo,
    sse,
    wait_for,
)

from encdec_fast import validate  # noqa: E402
from encdec_fast.engine.requests import REFUSED  # noqa: E402
from encdec_fast.server import ServerLimits, create_app  # noqa: E402
from encdec_fast.server_api import GENERATE_ARGS, GenerateResponse, too_deep  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet", "one_torch_thread")
IDS = [5, 6, 7]


@pytest.fixture(scope="module")
def ckpt(make_ckpt, tmp_path_factory):
    return checkpoint_with_tokenizer(make_ckpt, tmp_path_factory.mktemp("hostile") / "ckpt")  # 128 decoder positions


@pytest.fixture(scope="module")
def model(ckpt):
    return encdec_fast.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def engine(model):
    with encdec_fast.Engine(model, max_batch_size=8, max_input_tokens=64) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine)) as base:
        yield base


def count(base, code) -> float:
    return requests_total(base, code)


def is_error_body(r) -> bool:
    body = r.json()
    return (r.headers["content-type"] == "application/json" and set(body) == {"error", "type"}
            and isinstance(body["error"], str) and isinstance(body["type"], str))


# -- slow and vanishing clients ------------------------------------------------------------------------
def raw_client(base, head: bytes, body_start: bytes) -> socket.socket:
    """A connection that sent head and the start of a body, and then nothing."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(head + body_start)
    return sock


SIZED = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
CHUNKED = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")


def read_to_end(sock) -> bytes:
    out = []
    while chunk := sock.recv(65536):
        out.append(chunk)
    return b"".join(out)


def test_clients_that_never_finish_their_body_hold_no_capacity_and_get_408(engine, model):
    """8 connections send 5 of 20 bytes (or one chunk of a chunked body) and stall, with max_queued=2:
    other requests are admitted meanwhile (the slot is taken once the body is read), and each stalled
    one gets 408 with `Connection: close` after body_timeout_s, then the connection closes."""
    with running(create_app(engine, limits=ServerLimits(max_queued=2, body_timeout_s=2))) as base, \
            server_errors() as errors:
        slow = [raw_client(base, SIZED, b'{"inp') for _ in range(6)]
        slow += [raw_client(base, CHUNKED, b'5\r\n{"inp\r\n') for _ in range(2)]
        served = [httpx.post(base + "/v1/generate", json={"input": IDS, "max_new_tokens": 3}, timeout=60)
                  for _ in range(3)]
        answers = [read_to_end(s) for s in slow]
        for s in slow:
            s.close()
        timed_out = count(base, 408)
    assert [r.status_code for r in served] == [200] * 3, [r.text for r in served]
    assert served[0].json()["output_ids"] == solo(model, IDS, max_new_tokens=3)
    for a in answers:
        head, _, body = a.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), a
        assert json.loads(body)["type"] == "BodyTimeout" and "body_timeout_s=2" in json.loads(body)["error"]
    assert timed_out == 8
    assert not errors, [e.getMessage() for e in errors]


def test_clients_that_leave_mid_body_are_counted_499_and_log_no_traceback(engine):
    with running(create_app(engine)) as base, server_errors() as errors:
        for head, start in ((SIZED, b'{"inp'), (CHUNKED, b'5\r\n{"inp\r\n'), (SIZED, b"")):
            raw_client(base, head, start).close()
        wait_for(lambda: count(base, 499) == 3)
        after = httpx.post(base + "/v1/generate", json={"input": IDS, "max_new_tokens": 2}, timeout=60)
    assert after.status_code == 200
    assert not [e.getMessage() for e in errors]


# -- bad values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(no_repeat_ngram_size=2**63), dict(min_new_tokens=2**63), dict(top_k=2**63, do_sample=True),
    dict(max_new_tokens=2**63), dict(num_beams=2**64), dict(min_length=2**31), dict(eos_token_id=[2, 2**63]),
    dict(pad_token_id=-2**63 - 1), dict(decoder_start_token_id=2**64), dict(forced_eos_token_id=2**63),
    dict(repetition_penalty=7.9e307), dict(temperature=1e39, do_sample=True), dict(length_penalty=-1e300, num_beams=2),
])
def test_numbers_past_their_storage_are_invalid_input_over_http_generate_and_the_engine(url, model, engine, kw):
    """Integers past int64 (or int32 counts), reals past float32 (the decode tables' storage): 400, never 500."""
    name = next(iter(kw))
    for stream in (False, True):
        r = httpx.post(url + "/v1/generate", json={"input": IDS, "stream": stream, **kw}, timeout=60)
        assert r.status_code == 400 and r.json()["type"] == "InvalidInputError" and name in r.json()["error"], r.text
    with pytest.raises(InvalidInputError, match=name):
        model.generate(torch.tensor([IDS]), **kw)
    assert isinstance(engine.submit(IDS, **kw).exception(timeout=60), InvalidInputError)
    with pytest.raises(InvalidInputError, match=name):
        engine.stream(IDS, **kw)


def test_a_seed_past_uint64_is_invalid_input(url, engine):
    r = httpx.post(url + "/v1/generate", json={"input": IDS, "do_sample": True, "seed": 2**64}, timeout=60)
    assert r.status_code == 400 and "seed must be an int in [0, 18446744073709551615]" in r.json()["error"]
    assert isinstance(engine.submit(IDS, do_sample=True, seed=-1).exception(timeout=60), InvalidInputError)


@pytest.mark.parametrize("key,value", [("to_dict", 1), ("allow_custom_entries", True), ("__dict__", {}), ("foo", 1),
                                       ("typical_p", 0.5), ("output_scores", True), ("attention_mask", [1])])
def test_unknown_keys_are_400_at_the_http_layer(url, key, value):
    r = httpx.post(url + "/v1/generate", json={"input": IDS, key: value}, timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "InvalidInputError", r.text
    assert f"unknown argument(s) {key!r}" in r.json()["error"]


@pytest.mark.parametrize("key", ["to_dict", "allow_custom_entries", "__dict__", "defaults_only", "update"])
def test_generate_and_the_engine_refuse_names_that_are_not_generation_fields(model, engine, key):
    """GenerationConfig.update() sets any attribute the object has (methods included) and takes
    allow_custom_entries as its own switch: such names never reach it."""
    with pytest.raises(UnsupportedArgumentError, match=key):
        model.generate(torch.tensor([IDS]), max_new_tokens=2, **{key: 1})
    assert isinstance(engine.submit(IDS, max_new_tokens=2, **{key: 1}).exception(timeout=60), UnsupportedArgumentError)


def test_the_http_arguments_are_generation_fields_the_engine_takes():
    assert set(GENERATE_ARGS) <= set(validate.GENERATION_FIELDS) | {"bad_words_ids"}
    assert not set(GENERATE_ARGS) & set(REFUSED)


@pytest.mark.parametrize("forced", [97, [7, 500]])
def test_forced_eos_outside_the_vocabulary_is_refused_everywhere(url, model, engine, forced):
    r = httpx.post(url + "/v1/generate", json={"input": IDS, "forced_eos_token_id": forced}, timeout=60)
    assert r.status_code == 400 and "forced_eos_token_id=" in r.json()["error"], r.text
    assert "outside the decoder's vocabulary [0, 97)" in r.json()["error"]
    with pytest.raises(InvalidInputError, match="forced_eos_token_id"):
        model.generate(torch.tensor([IDS]), max_new_tokens=4, forced_eos_token_id=forced)
    assert isinstance(engine.submit(IDS, forced_eos_token_id=forced).exception(timeout=60), InvalidInputError)


def test_a_forced_eos_inside_the_vocabulary_ends_the_sequence(url, model):
    r = httpx.post(url + "/v1/generate", json={"input": IDS, "max_new_tokens": 4, "forced_eos_token_id": 7}, timeout=60)
    want = solo(model, IDS, max_new_tokens=4, forced_eos_token_id=7)
    assert r.status_code == 200 and r.json()["output_ids"] == want and want[-1] == 7


def test_integral_json_numbers_are_ints_and_other_numbers_are_refused(url, model):
    """JSON has one kind of number: 3.0 is the integer 3 (as JSON Schema's "integer" says); 3.5 is not."""
    r = httpx.post(url + "/v1/generate", json={"input": [5.0, 6, 7], "max_new_tokens": 3.0}, timeout=60)
    assert r.status_code == 200 and r.json()["output_ids"] == solo(model, IDS, max_new_tokens=3)
    r = httpx.post(url + "/v1/generate", json={"input": IDS, "max_new_tokens": 3.5}, timeout=60)
    assert r.status_code == 400 and "max_new_tokens must be an int" in r.json()["error"]


# -- deep JSON -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
                                  b'{"input": [5], "bad_words_ids": ' + b"[" * 40 + b"5" + b"]" * 40 + b"}"])
def test_deeply_nested_json_is_400_before_parsing_and_counted(url, body):
    before = count(url, 400)
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and is_error_body(r) and "deeper than 32 levels" in r.json()["error"], r.text
        assert r.headers.get("connection") != "close"
        again = client.post("/v1/generate", json={"input": IDS, "max_new_tokens": 2})  # the same connection
    assert again.status_code == 200
    assert count(url, 400) == before + 1


@pytest.mark.parametrize("body,deep", [
    (b'{"input": "' + b"[" * 40 + b'"}', False),  # brackets inside a string do not nest
    (b'{"input": "\\"' + b"[" * 40 + b'\\""}', False),  # escaped quotes do not end the string
    (b"[" * 32 + b"]" * 32, False),
    (b"[" * 33 + b"]" * 33, True),
    (b'[{"a": ' * 17 + b"1" + b"}]" * 17, True),
    (b"[" + b"[[]]," * 100 + b"[]]", False),  # many brackets, shallow
])
def test_the_depth_scan_counts_nesting_outside_strings(body, deep):
    assert too_deep(body) is deep
    json.loads(body)  # each is valid JSON


def test_brackets_inside_a_text_input_are_text(url):
    r = httpx.post(url + "/v1/generate", json={"input": "[" * 40, "max_new_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


# -- routes, schema, health ----------------------------------------------------------------------------
def test_404_405_and_401_answer_the_error_body_and_are_counted(engine):
    auth = {"Authorization": "Bearer k"}
    with running(create_app(engine, limits=ServerLimits(api_key="k"))) as base, \
            httpx.Client(base_url=base, timeout=60) as client:
        cases = [("GET", "/nope", auth, 404, "NotFound"), ("GET", "/v1/generate", auth, 405, "MethodNotAllowed"),
                 ("POST", "/health", {}, 405, "MethodNotAllowed"),
                 ("DELETE", "/metrics", auth, 405, "MethodNotAllowed"),
                 ("POST", "/v1/generate", {}, 401, "Unauthorized")]
        for method, path, headers, status, kind in cases:
            r = client.request(method, path, headers=headers)
            assert r.status_code == status and is_error_body(r) and r.json()["type"] == kind, (method, path, r.text)
        assert client.get("/v1/generate", headers=auth).headers["allow"] == "POST"
        assert client.get("/health").status_code == 200
        counted = {code: requests_total(base, code, headers=auth) for code in (200, 401, 404, 405)}
    assert counted == {200: 0.0, 401: 1.0, 404: 1.0, 405: 4.0}


def test_openapi_describes_the_bodies_and_metrics_is_text(url):
    spec = httpx.get(url + "/openapi.json", timeout=60).json()
    op, schemas = spec["paths"]["/v1/generate"]["post"], spec["components"]["schemas"]
    ref = "#/components/schemas/"
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": ref + "GenerateRequest"}
    req = schemas["GenerateRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["input"]
    assert set(req["properties"]) == {"input", "stream", "seed", *GENERATE_ARGS}
    assert {"maximum": 2**31 - 1, "minimum": 0, "type": "integer"} in req["properties"]["top_k"]["anyOf"]
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": ref + "GenerateResponse"}
    assert "text/event-stream" in ok
    for code in ("400", "401", "408", "413", "429", "500", "503", "504"):
        assert op["responses"][code]["content"]["application/json"]["schema"] == {"$ref": ref + "ErrorBody"}
    assert set(schemas["ErrorBody"]["properties"]) == {"error", "type"}
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert httpx.get(url + "/metrics", timeout=60).headers["content-type"].startswith("text/plain")


def test_health_is_degraded_while_an_engine_turn_is_stuck(model):
    """The decode step blocks until the test lets it go: /health turns 503 "degraded" once the turn has
    run longer than stalled_after_s, and ready again after it."""
    gate = threading.Event()
    with encdec_fast.Engine(model, max_batch_size=2) as eng, \
            running(create_app(eng, limits=ServerLimits(stalled_after_s=0.5))) as base:
        advance = eng._sched.pool.advance

        def stuck():
            gate.wait(60)
            return advance()

        eng._sched.pool.advance = stuck
        assert httpx.get(base + "/health", timeout=60).json() == {"status": "ready"} and eng.stats.stalled_s == 0
        fut = eng.submit(IDS, max_new_tokens=2)
        try:
            wait_for(lambda: httpx.get(base + "/health", timeout=60).status_code == 503)
            health = httpx.get(base + "/health", timeout=60).json()
            stalled = eng.stats.stalled_s
        finally:
            gate.set()
        assert fut.result(timeout=60).output_ids == solo(model, IDS, max_new_tokens=2)
        wait_for(lambda: httpx.get(base + "/health", timeout=60).status_code == 200)
        wait_for(lambda: eng.stats.stalled_s == 0)
    assert health["status"] == "degraded" and health["stalled_s"] > 0.5 and "stalled_after_s=0.5" in health["reason"]
    assert stalled > 0.5


def test_a_server_bug_answers_a_json_500_is_counted_and_closes_the_connection(url, engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "submit", broken)
    before = count(url, 500)
    with server_errors() as errors:
        r = httpx.post(url + "/v1/generate", json={"input": IDS}, timeout=60)
    assert r.status_code == 500 and is_error_body(r) and r.json()["type"] == "InternalServerError"
    assert "RuntimeError: a bug" in r.json()["error"] and r.headers["connection"] == "close"
    assert count(url, 500) == before + 1
    assert any("Exception in ASGI application" in e.getMessage() for e in errors)  # a bug is logged, with its traceback


@pytest.mark.parametrize("kw", [dict(body_timeout_s=0), dict(stalled_after_s=-1), dict(body_timeout_s="10")])
def test_bad_server_limits_are_refused(kw):
    with pytest.raises(InvalidInputError, match=next(iter(kw))):
        ServerLimits(**kw)


# -- schemathesis and a property-based fuzz ------------------------------------------------------------
def test_the_served_schema_holds_under_schemathesis(engine):
    """Schema-valid and schema-invalid requests to every route, in-process: no 5xx, every status and
    content type documented, every JSON answer valid against its schema, invalid data refused. (Valid
    data may still be refused: the vocabulary, the positions and the decode rows are the model's.)"""
    schemathesis = pytest.importorskip("schemathesis", reason="the test extra installs schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(engine))
    c = schemathesis.checks
    checks = [c.not_a_server_error, c.status_code_conformance, c.content_type_conformance,
              c.response_schema_conformance, c.response_headers_conformance, c.negative_data_rejection]
    seen = []
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        @given(case=schema.as_strategy(generation_mode=mode))
        @settings(max_examples=150, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            seen.append((case.path, case.call_and_validate(checks=checks).status_code))

        check()
    assert {("/v1/generate", 200), ("/v1/generate", 400), ("/health", 200), ("/metrics", 200)} <= set(seen)
    assert {("/v1/completions", 200), ("/v1/completions", 400), ("/v1/models", 200)} <= set(seen)


def junk_values():
    """Values of every JSON type, edges included (a hypothesis strategy)."""
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=6),
                     st.sampled_from([2**31, 2**63, 2**64, -2**63 - 1, 10**30, 1e308, [], {}, [[]]]),
                     st.lists(st.integers(-2, 120), max_size=3))


def test_a_fuzzed_generate_never_answers_5xx_and_errors_keep_their_shape(url):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    junk = junk_values()

    def plausible(field):
        """Values inside the field's range (still refused at times: rules across fields, the model's limits)."""
        if field.kind == "bool":
            return st.booleans()
        if field.kind == "real":
            return st.floats(-2 if field.lo is None else field.lo, 3 if field.hi is None else field.hi,
                             exclude_min=field.lo_open)
        if field.kind == "int":
            return st.integers(field.lo or 0, (field.lo or 0) + 12)
        return st.one_of(st.integers(0, 96), st.lists(st.integers(0, 96), min_size=1, max_size=3))

    def plausible_words():
        return st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=3), min_size=1, max_size=3)

    fair = {name: plausible(validate.GENERATION_FIELDS[name]) for name in GENERATE_ARGS if name != "bad_words_ids"}
    fair |= {"bad_words_ids": plausible_words(), "stream": st.booleans(), "seed": st.integers(0, 2**32)}
    hostile = {name: st.one_of(values, junk) for name, values in fair.items()}
    hostile["seed"] = st.one_of(st.integers(-1, 2**64), junk)
    fair_input = st.one_of(st.lists(st.integers(4, 96), min_size=1, max_size=12),
                           st.lists(st.sampled_from(VOCAB[4:]), max_size=8).map(" ".join))
    hostile_input = st.one_of(fair_input, st.text(max_size=20), st.lists(st.integers(-2, 100), max_size=12), junk)
    edge = st.one_of(  # at most one per fair request: what broke the server before (issue 22)
        st.tuples(st.sampled_from(sorted(fair)), st.sampled_from([2**31, 2**63, 2**64, -2**63 - 1, 97, 10**30])),
        st.tuples(st.sampled_from(["to_dict", "__dict__", "allow_custom_entries", "update", "foo"]), junk))
    fair_args = st.lists(st.sampled_from(sorted(fair)), max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: fair[name] for name in names}))  # a few arguments: often valid
    fair_request = st.tuples(st.fixed_dictionaries({"input": fair_input}), fair_args, st.lists(edge, max_size=1)
                             ).map(lambda t: {**t[0], **t[1], **dict(t[2])})
    hostile_request = st.tuples(
        st.fixed_dictionaries({"input": hostile_input}, optional=hostile),
        st.dictionaries(st.text(max_size=12), junk, max_size=2)).map(lambda t: {**t[1], **t[0]})
    bodies = st.one_of(
        fair_request.map(lambda b: json.dumps(b).encode()),
        hostile_request.map(lambda b: json.dumps(b).encode()),
        st.binary(max_size=64),
        st.one_of(st.integers(1, 40), st.sampled_from([1000, 10_000, 100_000])).map(lambda n: b"[" * n + b"]" * n),
        st.text(max_size=40).map(str.encode))

    accepted = {"input", "stream", "seed", *GENERATE_ARGS}
    with httpx.Client(base_url=url, timeout=60) as client:  # a hang is a ReadTimeout
        @given(body=bodies)
        @settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(body):
            r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, (body, r.text)
            try:
                keys = set(json.loads(body))
            except (ValueError, TypeError, RecursionError):
                keys = set()
            if keys - accepted:
                assert r.status_code == 400 and "unknown argument" in r.json()["error"], (body, r.text)
            if r.headers["content-type"].startswith("text/event-stream"):
                events = sse(r.text.splitlines())
                kind, last = events[-1]
                assert kind in ("done", "error") and (kind == "done" or set(last) == {"error", "type"}), events
            elif r.status_code == 200:
                GenerateResponse.model_validate(r.json())
            else:
                assert is_error_body(r), (body, r.text)

        check()


def test_a_request_beyond_the_engines_rows_or_token_budget_gets_400_and_others_go_on(model):
    """The issue's stall: 1000 sampled beams of 269 tokens ran alone and held the engine. Every request is
    bounded before it runs now: its decode rows by max_batch_size, its tokens by max_request_tokens."""
    import httpx

    with encdec_fast.Engine(model, max_batch_size=8, max_request_tokens=500) as engine, \
            running(create_app(engine)) as base, httpx.Client(base_url=base, timeout=60) as client:
        r = client.post("/v1/generate", json={"input": [5], "num_beams": 1000, "do_sample": True,
                                              "max_new_tokens": 100})
        assert r.status_code == 400 and "num_beams=1000 needs 1000 decode rows" in r.json()["error"]
        assert "max_batch_size=8" in r.json()["error"] and r.json()["type"] == "UnsupportedArgumentError"
        r = client.post("/v1/generate", json={"input": [5] * 20, "num_beams": 8, "do_sample": True, "seed": 1,
                                              "max_new_tokens": 60})
        assert r.status_code == 400 and "max_request_tokens=500" in r.json()["error"]
        r = client.post("/v1/generate", json={"input": [5], "num_beams": 2, "do_sample": True, "seed": 1,
                                              "max_new_tokens": 4})
        assert r.status_code == 200 and len(r.json()["output_ids"]) >= 2


def is_openai_error(body) -> bool:
    return (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == {"message", "type", "param", "code"} and isinstance(body["error"]["message"], str))


def test_a_fuzzed_completions_never_answers_5xx_and_errors_keep_openais_shape(url, model):
    """Plausible OpenAI requests (the served model, often valid) and hostile ones (junk in every field, unknown
    keys, raw bytes, deep JSON): never a 5xx or a hang; a 200 is a Completion, or a stream of chunks ending
    with [DONE]; every error is OpenAI's shape, an unknown key an unknown_parameter."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from encdec_fast.server_openai_api import Completion, CompletionRequest

    junk, name = junk_values(), str(model.path)
    text = st.lists(st.sampled_from(VOCAB[4:]), max_size=6).map(" ".join)
    ids = st.lists(st.integers(4, 96), min_size=1, max_size=10)
    fair = {
        "model": st.just(name), "prompt": st.one_of(text, ids, st.lists(text, min_size=1, max_size=3),
                                                    st.lists(ids, min_size=1, max_size=3)),
        "max_tokens": st.integers(1, 10), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
        "n": st.integers(1, 3), "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
            {}, optional={"include_usage": st.booleans()}), "seed": st.integers(0, 2**32),
        "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=4)),
        "echo": st.booleans(), "logprobs": st.one_of(st.none(), st.integers(0, 5)), "best_of": st.integers(1, 3),
        "suffix": st.sampled_from(["", "x"]), "presence_penalty": st.sampled_from([0, 0.5]),
        "frequency_penalty": st.sampled_from([0.0, -1.0]), "logit_bias": st.sampled_from([{}, {"5": 3}]),
        "user": st.text(max_size=5)}
    hostile = {key: st.one_of(values, junk) for key, values in fair.items()}
    fixed = ("model", "prompt", "stream")  # with a few others: often valid
    fair_request = st.tuples(st.fixed_dictionaries({k: fair[k] for k in fixed}),
                             st.lists(st.sampled_from(sorted(set(fair) - set(fixed))), max_size=4,
                                      unique=True).flatmap(lambda keys: st.fixed_dictionaries(
                                          {k: fair[k] for k in keys}))).map(lambda t: {**t[0], **t[1]})
    hostile_request = st.tuples(st.fixed_dictionaries({}, optional=hostile),
                                st.dictionaries(st.text(max_size=12), junk, max_size=2)).map(lambda t: {**t[1], **t[0]})
    bodies = st.one_of(fair_request.map(lambda b: json.dumps(b).encode()),
                       hostile_request.map(lambda b: json.dumps(b).encode()), st.binary(max_size=64),
                       st.sampled_from([40, 1000, 100_000]).map(lambda n: b"[" * n + b"]" * n))
    accepted = set(CompletionRequest.model_fields)
    with httpx.Client(base_url=url, timeout=60) as client:  # a hang is a ReadTimeout
        @given(body=bodies)
        @settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(body):
            r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, (body, r.text)
            try:
                keys = set(json.loads(body))
            except (ValueError, TypeError, RecursionError):
                keys = set()
            if keys - accepted:
                assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter", (body, r.text)
            if r.headers["content-type"].startswith("text/event-stream"):
                data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                assert data[-1] == "[DONE]", r.text
                for d in map(json.loads, data[:-1]):
                    assert is_openai_error(d) or Completion.model_validate(d), d
            elif r.status_code == 200:
                Completion.model_validate(r.json())
            else:
                assert is_openai_error(r.json()), (body, r.text)

        check()
