"""Every request is bounded before it runs, whatever its kind: its decode rows by max_batch_size, its tokens by
max_request_tokens, its decode state by the device's free memory (in generate() too). Beam sampling runs in the
continuous pool like every other request, so a cancel stops it at the next look and others keep being served."""

import time

import pytest
import torch
from conftest import beam_sampling_draws
from conftest import solo as conftest_solo

import encdec_fast
from encdec_fast import InvalidInputError, RequestCancelledError, UnsupportedArgumentError

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def model(make_ckpt):
    return encdec_fast.load(make_ckpt("bert", "gpt2"), device="cpu")


def test_beam_sampling_is_bounded_by_max_batch_size(model):
    with encdec_fast.Engine(model, max_batch_size=4) as engine:
        fut = engine.submit([5, 6, 7], num_beams=1000, do_sample=True, max_new_tokens=20, seed=1)
        with pytest.raises(UnsupportedArgumentError, match="num_beams=1000 needs 1000 decode rows .* max_batch_size=4"):
            fut.result(timeout=60)
        assert engine.submit([5, 6, 7], max_new_tokens=3).result(timeout=60).num_generated >= 1


def test_request_tokens_are_bounded_by_max_request_tokens(model):
    with encdec_fast.Engine(model, max_batch_size=8, max_request_tokens=100) as engine:
        fut = engine.submit([5] * 10, num_beams=4, max_new_tokens=20)  # 4 rows x (10 + 21) = 124 tokens
        with pytest.raises(InvalidInputError, match=r"4 decode rows x \(10 input \+ 21 output tokens\) = 124 tokens, "
                                                    r"more than this engine's max_request_tokens=100"):
            fut.result(timeout=60)
        assert engine.submit([5] * 10, num_beams=2, max_new_tokens=20).result(timeout=60).num_generated >= 1
    with pytest.raises(InvalidInputError, match="max_request_tokens must be an int >= 1"):
        encdec_fast.Engine(model, max_request_tokens=0)


@pytest.mark.parametrize("kw", [dict(num_beams=10**7), dict(num_return_sequences=10**7, do_sample=True)])
def test_generate_refuses_a_decode_state_beyond_free_memory(model, kw):
    """Refused before anything is allocated (10^7 rows would take terabytes), with the sizes named."""
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(InvalidInputError, match=r"decoding 10000000 rows of up to 5 tokens needs [\d.]+ GiB of decode "
                                                r"state, more than the [\d.]+ GiB free on cpu"):
        model.generate(ids, max_new_tokens=4, **kw)
    assert model.generate(ids, max_new_tokens=4).shape == (1, 5)  # the model is fine afterwards


@beam_sampling_draws
def test_beam_sampling_joins_the_pool_and_equals_solo_generate(model):
    """Beam sampling requests share decode steps with greedy and beam-search requests (no request runs alone
    any more), and each still gives model.generate's tokens on its own seed."""
    kws = [dict(num_beams=2, do_sample=True, top_k=20, seed=3), dict(), dict(num_beams=3),
           dict(num_beams=2, do_sample=True, num_return_sequences=2, seed=11), dict(do_sample=True, seed=5)]
    inputs = [[5 + i, 9, 17, 30 + i] for i in range(len(kws))]
    with encdec_fast.Engine(model, max_batch_size=16) as engine:
        results = engine.generate(inputs, request_kwargs=kws, max_new_tokens=8)
        stats = engine.stats
    for ids, kw, res in zip(inputs, kws, results):
        want = conftest_solo(model, ids, max_new_tokens=8, **kw)
        got = res.output_ids if kw.get("num_return_sequences", 1) > 1 else [res.output_ids]
        assert got == want, kw
    assert stats.mean_rows_per_step > 2  # they were stepped together


def test_a_running_beam_sampling_request_is_cancelled_at_the_next_look(model):
    with encdec_fast.Engine(model, max_batch_size=16) as engine:
        long = engine.submit([5, 6, 7], num_beams=4, do_sample=True, seed=2, max_new_tokens=120, min_new_tokens=120)
        deadline = time.monotonic() + 60
        while engine.stats.decode_steps < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.decode_steps >= 2 and engine.stats.requests_running == 1  # stepping in the pool
        assert not long.done()
        assert long.cancel()
        with pytest.raises(RequestCancelledError):
            long.result(timeout=60)
        t0 = engine.stats.decode_steps
        assert engine.submit([5, 6, 7], max_new_tokens=3).result(timeout=60).num_generated >= 1
        # the cancelled request stopped computing: the short one took a few steps, not the 120 left
        assert engine.stats.decode_steps - t0 < 20
