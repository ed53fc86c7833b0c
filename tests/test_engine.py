"""Engine: every request's output equals model.generate on it alone (greedy, processors, beam search,
seeded sampling) on mixed-length workloads; results come back in input order though they finish out
of order; concurrent submits lose nothing; bad requests fail alone; shutdown settles every future."""

import concurrent.futures as cf
import shutil
import threading
import time

import pytest
import torch
from conftest import solo

import encdec_fast
from encdec_fast import EngineClosedError, InvalidInputError, UnsupportedArgumentError

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def models(make_ckpt):
    """models(enc, dec) -> encdec_fast model; BERT-like decoders get the smaller weights that keep
    their outputs varied (see test_generation.py)."""
    kw = {("bert", "gpt2"): {}, ("roberta", "roberta"): dict(std=0.1, seed=0)}
    cache = {}

    def get(enc="bert", dec="gpt2"):
        if (enc, dec) not in cache:
            cache[enc, dec] = encdec_fast.load(make_ckpt(enc, dec, **kw[enc, dec]), device="cpu")
        return cache[enc, dec]

    return get


def workload(n, max_len, seed, vocab=97):
    """n inputs of random lengths 1..max_len (ids >= 4: no special or pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    lens[:2] = [1, max_len]  # the extremes always appear
    return [torch.randint(4, vocab, (m,), generator=g).tolist() for m in lens], g


def pick_eos(model, inputs, new=24):
    """A token that greedy decoding emits in some outputs but not all (varied stopping points)."""
    runs = [solo(model, x, max_new_tokens=new, eos_token_id=None)[0][1:] for x in inputs[:12]]
    share = {t: sum(t in r for r in runs) / len(runs) for t in {t for r in runs for t in r}}
    return min(share, key=lambda t: abs(share[t] - 0.5))


def rows_of(result):
    out = result.output_ids
    return out if isinstance(out[0], list) else [out]


MIXED = [
    {},
    dict(no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=3),
    dict(num_beams=3),
    dict(do_sample=True, top_k=10, temperature=0.7),
    dict(bad_words_ids=[[5], [7, 8]], min_length=4, eos_token_id=[9, "EOS"]),
    dict(num_beams=2, num_return_sequences=2, length_penalty=0.5),
    dict(do_sample=True, num_return_sequences=3, top_p=0.8),
    dict(num_beams=2, do_sample=True, top_k=20),
]


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta")])
def test_mixed_workload_matches_solo_generate_per_request(models, enc, dec):
    """Mixed lengths (1..128/130), budgets and generation arguments in one engine with few slots (refills,
    several encoder micro-batches, static beam batches): each output equals model.generate alone."""
    model = models(enc, dec)
    inputs, g = workload(40, model.cfg.encoder.max_length, seed=1)
    eos = pick_eos(model, inputs)
    kws = []
    for i in range(len(inputs)):
        kw = dict(eos_token_id=eos, max_new_tokens=int(torch.randint(1, 25, (1,), generator=g)))
        kw.update(MIXED[i % len(MIXED)])
        if kw["eos_token_id"] != eos:
            kw["eos_token_id"] = [9, eos]
        if kw.get("do_sample"):
            kw["seed"] = 100 + i
        kws.append(kw)
    with encdec_fast.Engine(model, max_batch_size=6, max_batch_tokens=256) as engine:
        results = engine.generate(inputs, request_kwargs=kws)
    early = 0
    for i, (ids, kw, res) in enumerate(zip(inputs, kws, results)):
        want = solo(model, ids, **kw)
        assert rows_of(res) == want, (i, kw, len(ids), want, res.output_ids)
        assert res.input_ids == ids and res.text is None
        early += len(want[0]) < kw["max_new_tokens"] + 1
    assert early >= 2, "no request stopped at eos: the workload would not test refills on early finish"


def test_static_step_with_late_looks_matches_solo_generate(models):
    """The CUDA path on the CPU: every step over the whole static buffers (what a captured graph runs),
    looks at the stop marks only every 16 steps; greedy, processors, beams and sampling mixed."""
    model = models("bert", "gpt2")
    inputs, g = workload(14, model.cfg.encoder.max_length, seed=3)
    eos = pick_eos(model, inputs)
    kws = []
    for i in range(len(inputs)):
        kw = dict(eos_token_id=eos, max_new_tokens=int(torch.randint(1, 30, (1,), generator=g))) | MIXED[i % 7]
        if kw["eos_token_id"] != eos:
            kw["eos_token_id"] = [9, eos]
        if kw.get("do_sample"):
            kw["seed"] = 7 + i
        kws.append(kw)
    model.graph_shapes = True
    try:
        with encdec_fast.Engine(model, max_batch_size=8, max_batch_tokens=256, check_every=16) as engine:
            results = engine.generate(inputs, request_kwargs=kws)
    finally:
        model.graph_shapes = False
    for i, (ids, kw, res) in enumerate(zip(inputs, kws, results)):
        assert rows_of(res) == solo(model, ids, **kw), (i, kw)


def test_encoder_micro_batches_are_cut_by_real_tokens_not_rows_times_longest():
    """The packed encoder pays for real tokens: 1 + 1 + 100 tokens fit a 128-token budget (padded they
    would be 3 x 100); rows and the budget still cut; an input over the budget goes alone."""
    from encdec_fast.engine.pool import token_chunks

    size = lambda n: n  # noqa: E731
    assert token_chunks([100, 1, 1], size, 128, 6) == [[1, 1, 100]]  # padded: 3 x 100 > 128
    lens = [100, 1, 1, 30, 200, 20]
    assert token_chunks(lens, size, 128, 6) == [[1, 1, 20, 30], [100], [200]]
    assert token_chunks(lens, size, 10_000, 2) == [[1, 1], [20, 30], [100, 200]]


def test_triton_backend_matches_solo_generate(make_ckpt):
    """The Triton kernels (the interpreter on a CPU) over the engine's strided cache and pool views, with
    and without kv_index (several sequences share a pool row)."""
    from conftest import DEVICE

    model = encdec_fast.load(make_ckpt("bert", "gpt2"), device=DEVICE, backend="triton")
    inputs, _ = workload(4, 40, seed=4)
    kws = [dict(max_new_tokens=4), dict(max_new_tokens=3, do_sample=True, num_return_sequences=2, seed=3),
           dict(max_new_tokens=4, repetition_penalty=1.2), dict(max_new_tokens=2)]
    with encdec_fast.Engine(model, max_batch_size=3) as engine:
        results = engine.generate(inputs, request_kwargs=kws)
    for x, kw, r in zip(inputs, kws, results):
        assert rows_of(r) == solo(model, x, **kw), kw


def test_results_come_back_in_input_order_though_finished_out_of_order(models):
    model = models()
    inputs, _ = workload(12, 40, seed=2)
    budgets = [40 - 3 * i for i in range(12)]  # early inputs run longest
    finished = []
    with encdec_fast.Engine(model, max_batch_size=12) as engine:
        futs = [engine.submit(x, max_new_tokens=b, eos_token_id=None) for x, b in zip(inputs, budgets)]
        for i, f in enumerate(futs):
            f.add_done_callback(lambda _, i=i: finished.append(i))
        results = engine.generate(inputs, request_kwargs=[dict(max_new_tokens=b, eos_token_id=None) for b in budgets])
        for f in futs:
            f.result()
    assert finished != sorted(finished), "requests finished in submission order; nothing was tested"
    assert [len(r.output_ids) for r in results] == [b + 1 for b in budgets]
    assert [r.output_ids for r in results] == [f.result().output_ids for f in futs]
    for x, b, r in zip(inputs, budgets, results):
        assert [r.output_ids] == solo(model, x, max_new_tokens=b, eos_token_id=None)


def test_500_requests_from_8_threads_none_lost(models):
    model = models()
    inputs, g = workload(500, 20, seed=3)
    budgets = torch.randint(1, 6, (500,), generator=g).tolist()
    futs: list = [None] * 500
    with encdec_fast.Engine(model, max_batch_size=16) as engine:
        def client(k):
            for i in range(k, 500, 8):
                futs[i] = engine.submit(inputs[i], max_new_tokens=budgets[i])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done, not_done = cf.wait(futs, timeout=120)
        assert not not_done
        stats = engine.stats
    assert stats.requests_submitted == stats.requests_completed == 500 and stats.requests_failed == 0
    assert stats.tokens_generated == sum(f.result().num_generated for f in futs)
    memo = {}
    for x, b, f in zip(inputs, budgets, futs):
        key = (tuple(x), b)
        if key not in memo:
            memo[key] = solo(model, x, max_new_tokens=b)[0]
        assert f.result().output_ids == memo[key]


def test_bad_requests_fail_alone(models):
    model = models()
    good, _ = workload(4, 30, seed=4)
    bad = [
        ([], {}, InvalidInputError, "empty"),
        ([5] * 131, {}, InvalidInputError, "at most 130"),
        ([5, 200, 7], {}, InvalidInputError, "outside the vocabulary"),
        ([5.0, 6.0], {}, InvalidInputError, "integer"),
        ([[5, 6], [7, 8]], {}, InvalidInputError, "one sequence"),
        ("no tokenizer here", {}, InvalidInputError, "tokenizer"),
        ([5, 6], dict(output_scores=True), UnsupportedArgumentError, "output_scores"),
        ([5, 6], dict(typical_p=0.5), UnsupportedArgumentError, "typical_p"),
        ([5, 6], dict(do_sample=True, temperature=0.0), InvalidInputError, "temperature"),
        ([5, 6], dict(max_new_tokens=500), InvalidInputError, "decoder positions"),
        ([5, 6], dict(do_sample=True, num_return_sequences=9), UnsupportedArgumentError, "max_batch_size"),
    ]
    inputs = [good[0]] + [b[0] for b in bad[:6]] + [good[1], good[2]] + [b[0] for b in bad[6:]] + [good[3]]
    kws = [{}] + [b[1] for b in bad[:6]] + [{}, {}] + [b[1] for b in bad[6:]] + [{}]
    with encdec_fast.Engine(model, max_batch_size=8) as engine:
        out = engine.generate(inputs, return_exceptions=True, request_kwargs=kws, max_new_tokens=6)
        errors = [r for r in out if isinstance(r, Exception)]
        assert len(errors) == len(bad)
        for err, (_, _, typ, words) in zip(errors, bad):
            assert isinstance(err, typ) and isinstance(err, encdec_fast.EncDecError), repr(err)
            assert words in str(err), str(err)
        for x, r in zip(good, [r for r in out if not isinstance(r, Exception)]):
            assert [r.output_ids] == solo(model, x, max_new_tokens=6)
        with pytest.raises(InvalidInputError, match="empty"):
            engine.generate([good[0], [], good[1]], max_new_tokens=3)
        assert isinstance(engine.submit([]).exception(), InvalidInputError)
        assert engine.submit(good[0], max_new_tokens=2).result().output_ids == solo(model, good[0], max_new_tokens=2)[0]


def test_a_step_that_fails_once_is_retried_and_every_request_still_matches_solo(models, monkeypatch):
    """A failure that is nobody's fault (here: the 3rd decode step raises once) costs no request: the
    pool's requests run again alone and the engine goes on serving."""
    model = models()
    inputs, _ = workload(6, 20, seed=5)
    step = model.net.decoder.step
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return step(*a, **k)

    monkeypatch.setattr(model.net.decoder, "step", flaky)
    with encdec_fast.Engine(model, max_batch_size=8) as engine:
        out = engine.generate(inputs, max_new_tokens=8, eos_token_id=None)
        again = engine.generate(inputs, max_new_tokens=8, eos_token_id=None)
    monkeypatch.undo()
    assert calls["n"] > 3
    want = [solo(model, x, max_new_tokens=8, eos_token_id=None) for x in inputs]
    assert [[r.output_ids] for r in out] == want and [[r.output_ids] for r in again] == want


def test_close_fails_pending_requests_and_refuses_new_ones(models):
    model = models()
    inputs, _ = workload(40, 30, seed=6)
    engine = encdec_fast.Engine(model, max_batch_size=4)
    futs = [engine.submit(x, max_new_tokens=100, eos_token_id=None) for x in inputs]
    futs.append(engine.submit(inputs[0], num_beams=2, max_new_tokens=100, eos_token_id=None))
    time.sleep(0.2)
    engine.close()
    assert all(f.done() for f in futs)
    errs = [f.exception() for f in futs]
    assert sum(isinstance(e, EngineClosedError) for e in errs) >= 30
    assert all(e is None or isinstance(e, EngineClosedError) for e in errs)
    assert "closed" in str(next(e for e in errs if e is not None))
    late = engine.submit(inputs[0])
    assert isinstance(late.exception(timeout=1), EngineClosedError)
    with pytest.raises(EngineClosedError):
        engine.generate(inputs[:2])
    engine.close()  # idempotent


def test_close_during_generate_from_another_thread(models):
    model = models()
    inputs, _ = workload(30, 30, seed=9)
    engine = encdec_fast.Engine(model, max_batch_size=4)
    first_done, out = threading.Event(), {}

    def run():
        out["results"] = engine.generate(inputs, return_exceptions=True, max_new_tokens=100, eos_token_id=None,
                                         request_kwargs=[dict(max_new_tokens=5 if i == 0 else 100) for i in range(30)],
                                         progress=lambda done, total: first_done.set())

    t = threading.Thread(target=run)
    t.start()
    assert first_done.wait(30)
    engine.close()
    t.join(30)
    assert not t.is_alive()
    results = out["results"]
    assert len(results) == 30 and sum(isinstance(r, EngineClosedError) for r in results) >= 20
    assert all(isinstance(r, (EngineClosedError, encdec_fast.engine.Result)) for r in results)


def test_close_inside_a_done_callback(models):
    model = models()
    inputs, _ = workload(10, 20, seed=12)
    engine = encdec_fast.Engine(model, max_batch_size=2)
    results = engine.generate(inputs, return_exceptions=True, max_new_tokens=30, eos_token_id=None,
                              progress=lambda done, total: engine.close() if done == 2 else None)
    assert sum(isinstance(r, encdec_fast.engine.Result) for r in results) >= 2
    assert sum(isinstance(r, EngineClosedError) for r in results) >= 6
    engine._sched.thread.join(10)
    assert not engine._sched.thread.is_alive()


def test_an_engine_dropped_without_close_finishes_its_requests(models):
    import gc

    model = models()
    inputs, _ = workload(6, 20, seed=10)
    engine = encdec_fast.Engine(model, max_batch_size=2)
    futs = [engine.submit(x, max_new_tokens=6) for x in inputs]
    thread = engine._sched.thread
    del engine
    gc.collect()
    assert [[f.result(timeout=30).output_ids] for f in futs] == [solo(model, x, max_new_tokens=6) for x in inputs]
    thread.join(10)
    assert not thread.is_alive()


def test_cancelled_requests_are_skipped(models):
    model = models()
    inputs, _ = workload(12, 20, seed=11)
    with encdec_fast.Engine(model, max_batch_size=1) as engine:
        futs = [engine.submit(x, max_new_tokens=20, eos_token_id=None) for x in inputs]
        cancelled = [f.cancel() for f in futs[6:]]
    assert any(cancelled)
    for f, c in zip(futs, [False] * 6 + cancelled):
        assert f.cancelled() if c else len(f.result().output_ids) == 21


def test_generate_inside_a_done_callback_is_refused(models):
    model = models()
    seen = []

    def progress(done, total):
        try:
            engine.generate([[5, 6]], max_new_tokens=2)
        except encdec_fast.EngineUsageError as e:
            seen.append(str(e))

    with encdec_fast.Engine(model) as engine:
        engine.generate([[5, 6, 7]], max_new_tokens=2, progress=progress)
    assert seen and "done-callback" in seen[0]


def test_leaving_the_with_block_drains_submitted_requests(models):
    model = models()
    inputs, _ = workload(10, 30, seed=7)
    with encdec_fast.Engine(model, max_batch_size=3) as engine:
        futs = [engine.submit(x, max_new_tokens=12) for x in inputs]
    assert all(f.done() and f.exception() is None for f in futs)
    assert not engine._sched.thread.is_alive()


def test_string_inputs_decode_with_the_checkpoint_tokenizer(models, make_ckpt, tmp_path):
    import transformers as T

    path = tmp_path / "with_tok"
    shutil.copytree(make_ckpt("bert", "gpt2"), path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]
    tok = T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(path)
    model = encdec_fast.load(path, device="cpu")
    texts = ["w1 w2 w3", "w40 w41 w7 w8 w9 w10 w11", "w5"]
    with encdec_fast.Engine(model) as engine:
        res = engine.generate(texts + [[2, 10, 3]], max_new_tokens=8)
    for text, r in zip(texts, res):
        ids = tok(text)["input_ids"]
        assert r.input_ids == ids
        assert [r.output_ids] == solo(model, ids, max_new_tokens=8)
        assert r.text == tok.decode(r.output_ids, skip_special_tokens=True) and isinstance(r.text, str)
    assert res[-1].text is None


def test_progress_bar_callback_and_stats(models, capsys):
    model = models()
    inputs, _ = workload(8, 20, seed=8)
    seen = []
    with encdec_fast.Engine(model, max_batch_size=4) as engine:
        a = engine.generate(inputs, max_new_tokens=5, progress=True)
        b = engine.generate(inputs, max_new_tokens=5, progress=lambda done, total: seen.append((done, total)))
        stats = engine.stats
    assert "8/8" in capsys.readouterr().err
    assert seen == [(i, 8) for i in range(1, 9)]
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert stats.requests_completed == 16 and stats.tokens_generated == 2 * sum(r.num_generated for r in a)
    assert stats.busy_s > 0 and stats.tokens_per_s > 0 and stats.decode_steps > 0
    assert all(r.num_generated == len(r.output_ids) - 1 for r in a)
    with encdec_fast.Engine(model) as engine:
        assert engine.generate([], max_new_tokens=5, progress=True) == []


def test_bad_word_tables_stay_bounded_over_many_requests(models):
    """Every request with multi-token bad words adds its sequences to the shared tables; those of requests
    that left are dropped, so a long-running engine does not grow (and outputs stay solo generate's)."""
    model = models("bert", "gpt2")
    inputs, _ = workload(90, 20, seed=7)
    kws = [dict(max_new_tokens=3, bad_words_ids=[[4 + i % 80, 5 + i % 7]]) for i in range(len(inputs))]
    with encdec_fast.Engine(model, max_batch_size=4) as engine:
        results = engine.generate(inputs, request_kwargs=kws)
        tables = engine._sched.pool.state.tables
        assert tables.bad_prefix.shape[0] <= 64 + 4, tables.bad_prefix.shape
    for i in range(0, 90, 17):
        assert rows_of(results[i]) == solo(model, inputs[i], **kws[i]), i
