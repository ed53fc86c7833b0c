"""Engine failure isolation: a bad request never fails another. Arguments that would
break a batch are refused at submit; what still fails inside a batch (an encoder micro-batch, the decode
steps, NaN logits, a beam-sampling run) is pinned on the request that caused it; the engine keeps
serving; its error classes are encdec_fast's; and a script that never calls close() exits cleanly."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import solo as conftest_solo
from poison import NAN, RAISE, STEP_RAISE, poison

import encdec_fast
from encdec_fast import (
    EngineClosedError,
    EngineUsageError,
    InvalidInputError,
    NumericalError,
)

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("bert", "gpt2")


@pytest.fixture
def model(ckpt):
    return encdec_fast.load(ckpt, device="cpu")  # a fresh one: some tests poison it


def inputs(n, seed=0, max_len=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 90, (int(torch.randint(1, max_len + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def solo(model, ids, **kw):
    rows = conftest_solo(model, ids, **kw)
    return rows[0] if len(rows) == 1 else rows


BAD_ARGS = [  # each broke its whole micro-batch or decode step before (raw IndexError / TypeError) or ran silently
    (dict(decoder_start_token_id=200), "decoder_start_token_id=200 is outside the decoder's vocabulary"),
    (dict(pad_token_id=200, num_return_sequences=2, do_sample=True), "pad_token_id=200 is outside"),
    (dict(max_new_tokens=6.5), "max_new_tokens must be an int >= 1, got 6.5"),
    (dict(decoder_start_token_id=-1), "decoder_start_token_id=-1 is outside"),
    (dict(pad_token_id=-1), "pad_token_id=-1 is outside"),
    (dict(num_beams=0), "num_beams must be an int >= 1, got 0"),
    (dict(num_beams=2, length_penalty="x"), "length_penalty must be a number, got 'x'"),
    (dict(eos_token_id=-1), "eos_token_id holds -1"),
    (dict(seed="x", do_sample=True), "seed must be an int"),
]


def test_arguments_that_broke_a_batch_fail_alone_in_generate(model):
    good = inputs(12, seed=1)
    batch = good + [[5, 6, 7]] * len(BAD_ARGS)
    kws = [{}] * len(good) + [kw for kw, _ in BAD_ARGS]
    with encdec_fast.Engine(model, max_batch_size=16) as engine:
        out = engine.generate(batch, request_kwargs=kws, return_exceptions=True, max_new_tokens=5)
    for x, r in zip(good, out):
        assert r.output_ids == solo(model, x, max_new_tokens=5)
    for (_, words), err in zip(BAD_ARGS, out[len(good):]):
        assert isinstance(err, InvalidInputError) and words in str(err), repr(err)


def test_arguments_that_broke_a_batch_fail_alone_among_in_flight_requests(model):
    good = inputs(20, seed=2)
    with encdec_fast.Engine(model, max_batch_size=8) as engine:
        futs = [engine.submit(x, max_new_tokens=12, eos_token_id=None) for x in good]
        bad = [engine.submit([5, 6], **{"max_new_tokens": 12, **kw}) for kw, _ in BAD_ARGS]
        for (_, words), f in zip(BAD_ARGS, bad):
            assert isinstance(f.exception(timeout=30), InvalidInputError) and words in str(f.exception())
        for x, f in zip(good, futs):
            assert f.result(timeout=60).output_ids == solo(model, x, max_new_tokens=12, eos_token_id=None)


@pytest.mark.parametrize("where,kw,err,words", [
    ("encoder micro-batch", dict(source=[5, RAISE, 7]), RuntimeError, "poisoned source"),
    ("decode step", dict(decoder_start_token_id=STEP_RAISE), RuntimeError, "poisoned decode step"),
    ("encoder micro-batch, beam search", dict(source=[5, RAISE, 7], num_beams=2), RuntimeError, "poisoned source"),
    ("NaN logits, greedy", dict(decoder_start_token_id=NAN), NumericalError, "NaN or inf logits"),
    ("NaN logits, sampling", dict(decoder_start_token_id=NAN, do_sample=True, seed=1), NumericalError, "NaN or inf"),
    ("NaN logits, beam search", dict(decoder_start_token_id=NAN, num_beams=2), NumericalError, "NaN or inf logits"),
    ("NaN logits, beam sampling", dict(decoder_start_token_id=NAN, num_beams=2, do_sample=True, seed=3), NumericalError,
     "NaN or inf logits"),
    ("decode step, beam sampling", dict(decoder_start_token_id=STEP_RAISE, num_beams=2, do_sample=True, seed=3),
     RuntimeError, "poisoned decode step"),
])
def test_a_request_failing_inside_a_batch_fails_alone_and_the_engine_goes_on(model, monkeypatch, where, kw, err, words):
    poison(model, monkeypatch.setattr)
    good = inputs(10, seed=3)
    kws = [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=2), dict(max_new_tokens=6, do_sample=True, seed=5),
           dict(max_new_tokens=6, repetition_penalty=1.3)] * 3
    kw = dict(kw)
    culprit = kw.pop("source", [5, 6, 7])
    batch = good[:5] + [culprit] + good[5:]
    kws = kws[:5] + [dict(max_new_tokens=6, **kw)] + kws[5:len(good)]
    with encdec_fast.Engine(model, max_batch_size=16) as engine:
        out = engine.generate(batch, request_kwargs=kws, return_exceptions=True)
        assert isinstance(out[5], err) and words in str(out[5]), (where, repr(out[5]))
        rest = out[:5] + out[6:]
        for x, k, r in zip(good, kws[:5] + kws[6:], rest):
            assert not isinstance(r, BaseException), (where, repr(r))
            assert r.output_ids == solo(model, x, **k), (where, k)
        later = engine.submit(good[0], max_new_tokens=4)  # still serving
        assert later.result(timeout=30).output_ids == solo(model, good[0], max_new_tokens=4)


def test_nan_logits_in_model_generate_raise_numerical_error(model, monkeypatch):
    poison(model, monkeypatch.setattr)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert model.generate(ids, max_new_tokens=3).shape == (2, 4)
    for kw in (dict(), dict(num_beams=2), dict(do_sample=True)):
        with pytest.raises(NumericalError, match="NaN or inf logits"):
            model.generate(ids, max_new_tokens=3, decoder_start_token_id=[3, NAN], **kw)


def test_engine_arguments_raise_encdec_errors(model):
    with pytest.raises(InvalidInputError, match="max_batch_size must be an int >= 1"):
        encdec_fast.Engine(model, max_batch_size=0)
    with pytest.raises(InvalidInputError, match="max_batch_tokens"):
        encdec_fast.Engine(model, max_batch_tokens=2.5)
    with encdec_fast.Engine(model) as engine:
        with pytest.raises(InvalidInputError, match="inputs must be a list"):
            engine.generate("one text")
        with pytest.raises(InvalidInputError, match="request_kwargs entries must be dicts"):
            engine.generate([[5, 6]], request_kwargs=[5])
        with pytest.raises(InvalidInputError, match="on_result must be a callable"):
            engine.generate([[5, 6]], on_result=3)
        with pytest.raises(InvalidInputError, match="progress must be"):
            engine.generate([[5, 6]], progress="yes")
        seen = []

        def progress(done, total):
            try:
                engine.generate([[5]], max_new_tokens=1)
            except EngineUsageError as e:  # an EncDecError, and a RuntimeError as before
                seen.append(e)

        engine.generate([[5, 6]], max_new_tokens=1, progress=progress)
        assert seen and isinstance(seen[0], encdec_fast.EncDecError)


def test_on_result_reports_each_input_as_it_settles(model):
    got = []
    with encdec_fast.Engine(model, max_batch_size=2) as engine:
        xs = inputs(5, seed=4)
        out = engine.generate(xs + [[]], return_exceptions=True, max_new_tokens=3,
                              on_result=lambda i, r: got.append((i, r)))
    assert sorted(i for i, _ in got) == list(range(6))
    assert dict(got)[5] is out[5] and isinstance(out[5], InvalidInputError)
    assert all(dict(got)[i].output_ids == out[i].output_ids for i in range(5))


_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
import encdec_fast
model = encdec_fast.load(sys.argv[1], device="cpu")
engine = encdec_fast.Engine(model, max_batch_size=4)
futs = [engine.submit([5, 6, 7 + i], max_new_tokens=5) for i in range(6)]
print("results", [len(f.result().output_ids) for f in futs], flush=True)
print("generate", len(engine.generate([[5, 6], [7, 8, 9]], max_new_tokens=3)), flush=True)
{tail}
"""
_TAILS = {
    "ends": "",
    "raises": "raise RuntimeError('the script fails after submitting')",
    "leaves work pending": textwrap.dedent("""
        def settled(f):
            print("settled", type(f.exception() or f.result()).__name__, flush=True)
        for i in range(20):
            engine.submit([5, 6, 7 + i], max_new_tokens=100, eos_token_id=None).add_done_callback(settled)
    """),
}


@pytest.mark.parametrize("tail", list(_TAILS))
def test_a_script_without_close_exits_cleanly(ckpt, tmp_path, tail):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(tail=_TAILS[tail]))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), str(ckpt)], capture_output=True, text=True, timeout=300)
    assert "terminate called" not in p.stderr and p.returncode != -6, p.stderr
    assert "results [6, 6, 6, 6, 6, 6]" in p.stdout and "generate 2" in p.stdout, p.stdout + p.stderr
    if tail == "raises":
        assert p.returncode == 1 and "the script fails after submitting" in p.stderr
        return
    assert p.returncode == 0, p.stderr
    if tail == "leaves work pending":  # every pending request settled, finished or EngineClosedError
        settled = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("settled")]
        assert len(settled) == 20 and set(settled) <= {"Result", EngineClosedError.__name__}, settled
        assert time.perf_counter() - t0 < 120
