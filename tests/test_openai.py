"""OpenAI's completions API (POST /v1/completions, GET /v1/models), spoken to by the openai package against
a tiny model served by uvicorn on 127.0.0.1: the text of every choice, streamed or not, is the decoded
output of model.generate with the arguments OpenAI's fields map to (greedy, seeded sampling, n > 1, lists
of prompts, token-id prompts), cut before a stop string with finish_reason "stop", "length" at
max_tokens, "stop" at eos; usage counts; streams never show a stop string and end with [DONE]; the API
key (AuthenticationError), an unknown model (NotFoundError), unsupported and unknown fields
(BadRequestError naming them), the queue (RateLimitError), time limits and a client that leaves; the
metrics count the route; /openapi.json describes it."""

import json
import threading

import pytest
import torch

import encdec_fast

openai = pytest.importorskip("openai", reason="the test extra installs openai")
httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
pytest.importorskip("uvicorn", reason="the test extra installs uvicorn")
from serving import checkpoint_with_tokenizer, metric, requests_total, running, wait_for  # noqa: E402

from encdec_fast.server import ServerLimits, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet", "one_torch_thread")
NAME = "tiny-bert2gpt2"
KEY = "k3y"
# a WordPiece vocabulary of the model's 97 ids; "abcdef" is a token because transformers' StopStringCriteria
# (the Engine's stop=) finds each token's text by decoding it after "abcdef"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(91)] + ["abcdef"]
EOS = 2  # the tiny checkpoint's eos ([CLS]: a special token, never in the text)
PROMPT = "w1 w2 w3"


@pytest.fixture(scope="module")
def ckpt(make_ckpt, tmp_path_factory):
    return checkpoint_with_tokenizer(make_ckpt, tmp_path_factory.mktemp("openai") / "ckpt", vocab=VOCAB)


@pytest.fixture(scope="module")
def tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def model(ckpt):
    return encdec_fast.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def engine(model):
    with encdec_fast.Engine(model, max_batch_size=8, max_input_tokens=64) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, limits=ServerLimits(api_key=KEY, max_body_bytes=4096), model_name=NAME)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def generated(model, tok, prompt, seed=None, stop=None, **kw) -> list[tuple[str, str, int]]:
    """model.generate on one prompt -> (text, finish_reason, tokens) per sequence, as OpenAI answers them:
    the decoded sequence, cut before the first stop string; "stop" at eos or a stop string, else "length"."""
    ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    if seed is not None:
        torch.manual_seed(seed)
    if stop:
        kw.update(stop_strings=stop, tokenizer=tok)
    out = []
    for row in model.generate(torch.tensor([ids]), **kw).tolist():
        gen = row[1:]
        n = gen.index(EOS) + 1 if EOS in gen else len([t for t in gen if t != 0])  # pad: 0
        text = tok.decode(gen[:n], skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
        stopped = bool(cuts) or EOS in gen[:n]
        out.append((text[:min(cuts)] if cuts else text, "stop" if stopped else "length", n))
    return out


def greedy(max_tokens):
    return dict(max_new_tokens=max_tokens, do_sample=False, num_beams=1)


def sampled(max_tokens, temperature, top_p, n):
    return dict(max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                num_beams=1, num_return_sequences=n)


def answered(completion) -> list[tuple[str, str, int]]:
    return [(c.text, c.finish_reason, c.index) for c in completion.choices]


def streamed(client, **kw) -> tuple[list, list]:
    """-> ((text, finish_reason, index) per choice, the chunks): a stream's chunks folded per choice, each
    choice's finish_reason in its last chunk and no chunk after it."""
    chunks = list(client.completions.create(stream=True, **kw))
    texts, reasons = {}, {}
    for ch in chunks:
        for c in ch.choices:
            assert c.index not in reasons, "a chunk after the choice's finish_reason"
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    assert set(texts) == set(reasons), "a choice without finish_reason"
    return [(texts[i], reasons[i], i) for i in sorted(texts)], chunks


# -- text -------------------------------------------------------------------------------------------------
def test_greedy_completions_are_model_generates_text_streamed_or_not(client, model, tok, engine):
    want = generated(model, tok, PROMPT, **greedy(9))
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=9, temperature=0)
    assert answered(got) == [(want[0][0], want[0][1], 0)]
    res = engine.submit(PROMPT, max_new_tokens=9, do_sample=False).result(timeout=60)
    assert got.choices[0].text == res.text  # the Engine's own text (special tokens skipped)
    assert got.object == "text_completion" and got.model == NAME and got.id.startswith("cmpl-")
    assert got.usage.prompt_tokens == len(tok(PROMPT)["input_ids"]) and got.usage.completion_tokens == want[0][2]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    choices, chunks = streamed(client, model=NAME, prompt=PROMPT, max_tokens=9, temperature=0)
    assert choices == answered(got) and len(chunks) > 2 and all(ch.usage is None for ch in chunks)


def test_max_tokens_reached_is_length_and_openais_default_is_16(client, model, tok):
    want = generated(model, tok, [5, 6, 7], **greedy(16))
    assert want[0][1] == "length", "the tiny model ended early: pick another prompt"
    got = client.completions.create(model=NAME, prompt=[5, 6, 7], temperature=0)  # max_tokens: OpenAI's 16
    assert answered(got) == [(want[0][0], "length", 0)] and got.usage.completion_tokens == 16
    assert got.usage.prompt_tokens == 3


def test_seeded_sampling_with_n_choices_is_model_generates_draws(client, model, tok):
    want = generated(model, tok, PROMPT, seed=7, **sampled(8, 0.8, 0.9, 3))
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, n=3, seed=7)
    got = client.completions.create(**kw)
    assert answered(got) == [(t, r, i) for i, (t, r, _) in enumerate(want)]
    assert got.usage.completion_tokens == sum(n for _, _, n in want)
    choices, _ = streamed(client, **kw)
    assert choices == answered(got)
    assert len({t for t, _, _ in want}) > 1, "three draws gave one text: the seed reached no sampler"


def test_a_list_of_prompts_gives_n_choices_each_in_openais_order(client, model, tok):
    """Greedy with n=2: the sequence once, answered twice (what OpenAI answers at temperature 0)."""
    prompts = ["w4 w5", "w6", "w7 w8 w9 w10"]
    wants = [generated(model, tok, p, **greedy(6))[0] for p in prompts]
    got = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert answered(got) == [(w[0], w[1], 2 * i + j) for i, w in enumerate(wants) for j in range(2)]
    assert got.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)
    assert got.usage.completion_tokens == 2 * sum(w[2] for w in wants)
    choices, _ = streamed(client, model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert choices == answered(got)


def test_token_id_prompts(client, model, tok):
    prompts = [[5, 6, 7], [8, 9]]
    wants = [generated(model, tok, p, **greedy(5))[0] for p in prompts]
    got = client.completions.create(model=NAME, prompt=prompts, max_tokens=5, temperature=0)
    assert answered(got) == [(w[0], w[1], i) for i, w in enumerate(wants)] and got.usage.prompt_tokens == 5
    one = client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=5, temperature=0)
    assert answered(one) == answered(got)[:1]


# -- stop strings and eos ----------------------------------------------------------------------------------
def words(model, tok, prompt, n=12):
    return generated(model, tok, prompt, **greedy(n))[0][0].split(" ")


@pytest.mark.parametrize("pick", ["one word", "two words", "a word's start", "two strings"])
def test_stop_strings_cut_the_text_before_them_streamed_or_not(client, model, tok, pick):
    """The greedy text's words make the stop strings (so that they occur); a stream never shows one, and
    the text that could begin one is held back until it is decided."""
    w = words(model, tok, PROMPT)
    stop = {"one word": [w[3]], "two words": [f"{w[2]} {w[3]}"], "a word's start": [w[4][:2] + "x", w[4]],
            "two strings": [w[5], w[3] + " " + w[4]]}[pick]
    want = generated(model, tok, PROMPT, stop=stop, **greedy(12))[0]
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    got = client.completions.create(**kw)
    assert answered(got) == [(want[0], "stop", 0)]
    assert not any(s in got.choices[0].text for s in stop) and len(got.choices[0].text) < len(" ".join(w))
    choices, chunks = streamed(client, **kw)
    assert choices == answered(got)
    assert not any(s in c.text for ch in chunks for c in ch.choices for s in stop)


def test_stop_strings_with_sampled_choices(client, model, tok):
    w = generated(model, tok, PROMPT, seed=3, **sampled(10, 1.0, 1.0, 2))[0][0].split(" ")
    want = generated(model, tok, PROMPT, seed=3, stop=[w[2]], **sampled(10, 1.0, 1.0, 2))
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=10, n=2, seed=3, stop=w[2])
    got = client.completions.create(**kw)
    assert answered(got) == [(t, r, i) for i, (t, r, _) in enumerate(want)] and got.choices[0].finish_reason == "stop"
    assert streamed(client, **kw)[0] == answered(got)


def test_eos_ends_a_choice_with_stop(make_ckpt, model, tok, tmp_path):
    """A copy of the checkpoint whose eos is a later token of the greedy output (an ordinary token of the
    tokenizer, so the text shows it, as the Engine's text does; a real checkpoint's eos is a special token)."""
    import shutil

    w = words(model, tok, PROMPT)
    k = next(k for k in range(1, len(w)) if w[k] not in w[:k])  # its first appearance ends the choice
    folder = shutil.copytree(model.path, tmp_path / "eos")
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg["eos_token_id"] = tok.convert_tokens_to_ids(w[k])
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    with encdec_fast.Engine(encdec_fast.load(folder, device="cpu")) as eng, running(create_app(eng)) as base, \
            openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as c:
        name = c.models.list().data[0].id
        assert name == str(folder)  # create_app's default: the checkpoint folder
        got = c.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
        streamed_choices, _ = streamed(c, model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert answered(got) == [(" ".join(w[:k + 1]), "stop", 0)] and got.usage.completion_tokens == k + 1  # with eos
    assert streamed_choices == answered(got)


def test_stop_strings_with_a_vocabulary_transformers_stop_criteria_cannot_read(make_ckpt, tmp_path, caplog):
    """transformers' StopStringCriteria cannot be built for tests/serving.py's vocabulary (no "abcdef"
    token): the Engine's stop= then matches on the decoded text (decode/host.py's TextStopCriteria), with
    the same answers, and nothing is logged."""
    from serving import VOCAB as PLAIN
    from transformers import AutoTokenizer

    folder = checkpoint_with_tokenizer(make_ckpt, tmp_path / "plain", vocab=PLAIN)
    plain, tok = encdec_fast.load(folder, device="cpu"), AutoTokenizer.from_pretrained(str(folder))
    w = words(plain, tok, PROMPT)
    stop = [f"{w[2]} {w[3]}"]
    full = generated(plain, tok, PROMPT, **greedy(12))[0][0]
    with encdec_fast.Engine(plain) as eng, running(create_app(eng, model_name=NAME)) as base, \
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        stopped = eng.submit(PROMPT, stop=stop, **greedy(12)).result(timeout=60).output_ids
        assert tok.decode(stopped, skip_special_tokens=True) == full[:full.find(stop[0]) + len(stop[0])]
        kw = dict(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
        with caplog.at_level("WARNING", logger="encdec_fast.server"):
            got = [c.completions.create(**kw) for _ in range(2)]
            choices, _ = streamed(c, **kw)
    assert answered(got[0]) == answered(got[1]) == [(full[:full.find(stop[0])], "stop", 0)] == choices
    assert not caplog.records


def test_stream_options_include_usage_adds_a_last_chunk(client, tok):
    chunks = list(client.completions.create(model=NAME, prompt=["w1", "w2 w3"], max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and all(ch.usage is None for ch in chunks[:-1])
    assert last.usage.prompt_tokens == len(tok("w1")["input_ids"]) + len(tok("w2 w3")["input_ids"])
    assert last.usage.completion_tokens == 8 and last.usage.total_tokens == last.usage.prompt_tokens + 8


def test_streams_end_with_done(url):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


# -- refusals ------------------------------------------------------------------------------------------------
def test_the_api_key_is_needed(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model=NAME, prompt=PROMPT)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and "API key is wrong" in e.value.message
    for r in (httpx.get(url + "/v1/models", timeout=60), httpx.post(url + "/v1/completions", json={}, timeout=60)):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_lists_the_served_name_and_another_model_is_404(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    for call in (lambda: client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT),
                 lambda: client.models.retrieve("gpt-3.5-turbo-instruct")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and e.value.param == "model"
        assert f"serves `{NAME}`" in e.value.message and e.value.type == "invalid_request_error"


@pytest.mark.parametrize("kw,name", [(dict(echo=True), "echo"), (dict(logprobs=1), "logprobs"),
                                     (dict(best_of=3), "best_of"), (dict(suffix="end"), "suffix"),
                                     (dict(presence_penalty=0.5), "presence_penalty"),
                                     (dict(frequency_penalty=-1), "frequency_penalty"),
                                     (dict(logit_bias={"5": 10}), "logit_bias")])
def test_unsupported_fields_are_400_naming_them(client, kw, name):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=PROMPT, **kw)
    assert e.value.code == "unsupported_parameter" and e.value.param == name
    assert f"unsupported parameter(s) {name}" in e.value.message


def test_harmless_fields_are_accepted(client, model, tok):
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=False, logprobs=None,
                                    best_of=1, suffix="", presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                    user="someone")
    assert got.choices[0].text == generated(model, tok, PROMPT, **greedy(4))[0][0]


@pytest.mark.parametrize("kw,param,words", [
    (dict(extra_body={"top_k": 5}), "top_k", "unknown parameter(s) 'top_k'"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (dict(temperature=2.5), "temperature", "temperature"),
    (dict(n=9), None, "num_return_sequences=9 needs 9 decode rows"),  # the engine's max_batch_size=8
    (dict(max_tokens=0), "max_tokens", "max_tokens"),
    (dict(prompt=[]), "prompt", '"prompt" must be'),
    (dict(prompt=[5, 600]), None, "outside the vocabulary"),
    (dict(prompt="w1 " * 70), None, "max_input_tokens=64"),
    (dict(stream_options={"include_usage": True}), "stream_options", "only allowed when"),
])
def test_bad_values_are_400_with_openais_error(client, kw, param, words):
    kw = {"model": NAME, "prompt": PROMPT, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw)
    assert words in e.value.message and e.value.param == param and e.value.type == "invalid_request_error"


def test_body_limits_and_method_errors_take_openais_shape(url):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [55] * 2000}, headers=auth, timeout=60)
    get = httpx.get(url + "/v1/completions", headers=auth, timeout=60)
    bad = httpx.post(url + "/v1/completions", content=b"{", headers=auth, timeout=60)
    for r, status, code in ((big, 413, "body_too_large"), (get, 405, "method_not_allowed"), (bad, 400, "invalid_json")):
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text


# -- limits and metrics ------------------------------------------------------------------------------------
def test_the_queue_counts_prompts_and_answers_429(engine):
    """max_queued=3: a request of 2 prompts held in flight (the engine stopped between turns) leaves room for
    one; 2 more are 429 (RateLimitError), 4 at once can never be admitted (400)."""
    with running(create_app(engine, limits=ServerLimits(max_queued=3), model_name=NAME)) as base, \
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        out = {}
        with engine._sched.drive_lock:
            held = threading.Thread(target=lambda: out.update(r=c.completions.create(model=NAME, prompt=["w1", "w2"],
                                                                                     max_tokens=2)))
            held.start()
            wait_for(lambda: metric(base, "encdec_fast_queue_depth") == 2)
            with pytest.raises(openai.RateLimitError) as full:
                c.completions.create(model=NAME, prompt=["w1", "w2"], max_tokens=2)
            with pytest.raises(openai.BadRequestError) as never:
                c.completions.create(model=NAME, prompt=["w1"] * 4, max_tokens=2)
        held.join(60)
    assert "max_queued=3" in full.value.message and full.value.response.headers["retry-after"] == "1"
    assert full.value.code == "queue_full" and full.value.type == "requests"
    assert "4 prompts, more than the server's max_queued=3" in never.value.message
    assert len(out["r"].choices) == 2


def test_the_request_time_limit_is_504_or_an_error_chunk(engine):
    with running(create_app(engine, limits=ServerLimits(request_timeout_s=0.3), model_name=NAME)) as base, \
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        cancelled = engine.stats.requests_cancelled
        with engine._sched.drive_lock:  # nothing runs: both time out
            with pytest.raises(openai.InternalServerError) as plain:
                c.completions.create(model=NAME, prompt=["w1", "w2"], max_tokens=3)
            with pytest.raises(openai.APIError) as stream:
                list(c.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, stream=True))
        wait_for(lambda: engine.stats.requests_cancelled == cancelled + 3)
    assert plain.value.status_code == 504 and "request_timeout_s=0.3" in plain.value.message
    assert "request_timeout_s=0.3" in stream.value.message and stream.value.code == "request_timeout"


def test_a_client_that_leaves_a_stream_frees_its_slots(model, tok):
    prompts = ["w1", "w2"]
    assert all(generated(model, tok, p, **greedy(100))[0][1] == "length" for p in prompts), "pick prompts without eos"
    with encdec_fast.Engine(model, max_batch_size=2) as eng, running(create_app(eng, model_name=NAME)) as base:
        body = {"model": NAME, "prompt": prompts, "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            first = next(r.iter_lines())
        assert first.startswith("data: {")
        wait_for(lambda: eng.stats.requests_cancelled == 2)
        wait_for(lambda: requests_total(base, 499, "/v1/completions") == 1)
        assert metric(base, "encdec_fast_queue_depth") == 0 and eng.stats.decode_steps < 100


def test_503_while_loading(engine):
    app = create_app(None, model_name=NAME)
    with running(app) as base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=NAME, prompt=PROMPT)
        assert e.value.status_code == 503 and e.value.code == "unavailable" and e.value.type == "server_error"
        app.state.encdec.ready(engine)
        assert c.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices[0].finish_reason


def test_metrics_count_the_route(url, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = requests_total(url, 200, "/v1/completions", auth), metric(url, "encdec_fast_generated_tokens_total", auth)
    bad = requests_total(url, 404, "/v1/completions", auth)
    got = client.completions.create(model=NAME, prompt=["w1", "w2"], max_tokens=3, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="w1", max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="w1")
    after = requests_total(url, 200, "/v1/completions", auth), metric(url, "encdec_fast_generated_tokens_total", auth)
    assert after[0] == before[0] + 2 and requests_total(url, 404, "/v1/completions", auth) == bad + 1
    assert after[1] == before[1] + got.usage.completion_tokens + chunks[-1].usage.completion_tokens


def test_openapi_describes_completions_and_models(url):
    spec = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    op, schemas, ref = spec["paths"]["/v1/completions"]["post"], spec["components"]["schemas"], "#/components/schemas/"
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": ref + "CompletionRequest"}
    req = schemas["CompletionRequest"]
    assert req["additionalProperties"] is False and set(req["required"]) == {"model", "prompt"}
    assert req["properties"]["model"]["enum"] == [NAME]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": ref + "Completion"}
    assert "text/event-stream" in op["responses"]["200"]["content"]
    for code in ("400", "401", "404", "408", "413", "429", "500", "503", "504"):
        assert op["responses"][code]["content"]["application/json"]["schema"] == {"$ref": ref + "OpenAIErrorBody"}
    models = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models == {"$ref": ref + "ModelList"} and "/v1/models/{model}" in spec["paths"]
