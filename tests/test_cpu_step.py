"""The whole decoder step in one C++ call (encdec_fast/cpu/step.py, csrc encdec_cpu_decoder_step) against the op-table
path it replaces (modules.Decoder.step through cpu/weights.TABLE's products and attention, one call each): the same
logits, caches and tokens for each decoder layout (pre-LN GPT-2; post-LN BERT, RoBERTa, BART, bert-generation and ELECTRA, with and
without the LM head's transform, which ELECTRA's narrows) and each CPU storage (fp32, bf16, int8), at awkward batch shapes (rows of different source and
prompt lengths, beams sharing a source, a first step whose caches hold one slot a row). Its refusals: caches in
another layout, windows out of range."""

import dataclasses

import pytest
import torch
from conftest import right_padded

import encdec_fast
from encdec_fast import modules
from encdec_fast.cpu import kernels as ck
from encdec_fast.cpu import step as cpu_step

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only path"),
    pytest.mark.skipif(ck.library() is None, reason=f"CPU kernels not available here: {ck.reason()}"),
]

STORAGE = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}}


@pytest.fixture
def both_paths(monkeypatch):
    """Every Decoder.step runs the one-call path, then (caches restored) the op-table path on the same inputs; the
    logits and the caches each leaves must be equal. Returns the list of (logits max diff, cache max diff, rows)."""
    seen = []
    orig = modules.Decoder.step

    def step(self, seq, t, cache, cross_kv, cross_starts, enc_lens, enc_bound, ops):
        assert ops.decoder_step is cpu_step.decoder_step
        flat = cache[0] + cache[1]
        before = [c.clone() for c in flat]
        one = orig(self, seq, t, cache, cross_kv, cross_starts, enc_lens, enc_bound, ops)
        after_one = [c.clone() for c in flat]
        for c, b in zip(flat, before):
            c.copy_(b)
        ref = orig(self, seq, t, cache, cross_kv, cross_starts, enc_lens, enc_bound,
                   dataclasses.replace(ops, decoder_step=None))
        seen.append(((one - ref).abs().max().item(),
                     max(((a.float() - c.float()).abs().max().item() for a, c in zip(after_one, flat)), default=0.0),
                     one.shape[0]))
        return ref

    monkeypatch.setattr(modules.Decoder, "step", step)
    return seen


@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("dec,dec_kw", [("gpt2", {}), ("bert", {}), ("roberta", {}), ("bart", {}),
                                        ("bert", {"hidden_act": "gelu_new"}), ("bert-generation", {}),
                                        ("electra", {"embedding_size": 20})])  # a head narrower than the stream
def test_one_call_step_equals_the_op_path(make_ckpt, both_paths, storage, dec, dec_kw):
    # hidden 48 (3 heads of 16), intermediate 101 (odd: a partial 32-output block), vocab 131
    path = make_ckpt("bert", dec, enc_hidden=48, heads=3, vocab=131, intermediate=101, dec_kw=dec_kw or None)
    m = encdec_fast.load(path, **STORAGE[storage])
    assert cpu_step.program(m.net.decoder) is not None
    ids, mask = right_padded(131, [9, 4, 13])
    m.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    m.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert len(both_paths) == 11
    assert {rows for *_, rows in both_paths} >= {3, 9}
    for logits_diff, cache_diff, _ in both_paths:
        if dec == "gpt2":  # the same products on the same inputs: bitwise, and the same K/V in the same slots
            assert logits_diff == 0.0 and cache_diff == 0.0
        else:  # post-LN: the residual's LayerNorm is the kernels' instead of torch's (rounding only; a bf16 cache
            # rounds a key that lands on a rounding boundary one bf16 step apart)
            assert logits_diff < 1e-3 and cache_diff < (1e-4 if storage == "fp32" else 4e-3)


@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("dec", ["gpt2", "bert"])
def test_tokens_and_scores_equal_the_op_path(make_ckpt, storage, dec):
    # whole generate() calls, each path alone (continuous steps over its own caches)
    path = make_ckpt("bert", dec, enc_hidden=48, heads=3, vocab=131, intermediate=101)
    m = encdec_fast.load(path, **STORAGE[storage])
    ids, mask = right_padded(131, [9, 4, 13, 1], seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=7, output_logits=True, return_dict_in_generate=True)
    runs = []
    for table in (m.ops, dataclasses.replace(m.ops, decoder_step=None)):
        m.ops = table
        runs.append([m.generate(ids, **kw), m.generate(ids, num_beams=3, **kw)])
    for one, ref in zip(*runs):
        assert torch.equal(one.sequences, ref.sequences)
        for a, b in zip(one.logits, ref.logits):
            # post-LN: the rounding differences of the residual's LayerNorm carry over steps (through a bf16 cache,
            # a key one bf16 step apart); pre-LN: bitwise
            atol = 0 if dec == "gpt2" else 1e-3 if storage == "fp32" else 3e-2
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_the_engine_steps_equal_the_op_path(make_ckpt, both_paths):
    # continuous batching: rows join and leave mid-run (idle rows between busy ones, a refilled slot's cache holding
    # an earlier request's keys past its own), greedy and beam requests in one pool
    path = make_ckpt("bert", "gpt2", enc_hidden=48, heads=3, vocab=131, intermediate=101)
    m = encdec_fast.load(path)
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randint(5, 131, (int(n),), generator=g).tolist() for n in (3, 17, 1, 9, 30, 6, 12)]
    kws = [dict(max_new_tokens=n, min_new_tokens=n) for n in (2, 9, 5, 1, 7, 3, 8)]
    kws[3].update(num_beams=2)
    with encdec_fast.Engine(m, max_batch_size=3) as engine:
        engine.generate(inputs, request_kwargs=kws)
    assert len(both_paths) >= 8
    for logits_diff, cache_diff, _ in both_paths:
        assert logits_diff == 0.0 and cache_diff == 0.0


def test_the_program_follows_the_weights(make_ckpt):
    # a move to another dtype repacks the weights: the kept program must not read the old ones
    path = make_ckpt("bert", "gpt2", enc_hidden=32, heads=2, vocab=97)
    m = encdec_fast.load(path)
    ids, mask = right_padded(97, [7, 5])
    first = m.generate(ids, attention_mask=mask, max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    prog = cpu_step.program(m.net.decoder)
    assert prog is not None and prog.layers[0].qkv.kind == 0
    m.to(torch.bfloat16)
    prog_bf16 = cpu_step.program(m.net.decoder)
    assert prog_bf16 is not prog and prog_bf16.layers[0].qkv.kind == 1
    again = m.generate(ids, attention_mask=mask, max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    ref = encdec_fast.load(path, dtype=torch.bfloat16)
    ref.ops = dataclasses.replace(ref.ops, decoder_step=None)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, want.logits))
    assert not all(torch.equal(a, b) for a, b in zip(again.logits, first.logits))


def test_the_step_refuses_what_it_cannot_read(make_ckpt):
    path = make_ckpt("bert", "gpt2", enc_hidden=32, heads=2, vocab=97)
    m = encdec_fast.load(path)
    dec = m.net.decoder
    E, H, D, N, L, T = 32, 2, 16, 2, 5, 7
    x = torch.randn(N, E)
    ks = [torch.zeros(N, L, H, D) for _ in dec.layers]
    vs = [torch.zeros(N, L, H, D) for _ in dec.layers]
    cross = [(torch.randn(T, H, D), torch.randn(T, H, D)) for _ in dec.layers]
    starts, lens = torch.tensor([0, L]), torch.tensor([3, 2], dtype=torch.int32)
    cs, cl = torch.tensor([0, 3]), torch.tensor([3, 4], dtype=torch.int32)
    out = cpu_step.decoder_step(dec, x, starts, lens, (ks, vs), cross, cs, cl)
    assert out.shape == (N, 97) and torch.isfinite(out).all()
    # a new key's slot past the cache: refused before anything is written
    before = [k.clone() for k in ks]
    with pytest.raises(RuntimeError, match="decoder_step: bad sizes"):
        cpu_step.decoder_step(dec, x, starts, torch.tensor([3, L + 1], dtype=torch.int32), (ks, vs), cross, cs, cl)
    assert all(torch.equal(a, b) for a, b in zip(ks, before))
    # caches in a layout the kernels do not read (heads not contiguous): the op-table path runs instead
    odd = [k.transpose(2, 3).contiguous().transpose(2, 3) for k in ks]
    assert cpu_step.decoder_step(dec, x, starts, lens, (odd, odd), cross, cs, cl) is None
    assert cpu_step.decoder_step(dec, x, starts, lens, ([k.half() for k in ks], vs), cross, cs, cl) is None
    short = [(k[:T - 1], v) for k, v in cross]  # a layer's arena shorter than the first's
    assert cpu_step.decoder_step(dec, x, starts, lens, (ks, vs), cross[:1] + short[1:], cs, cl) is None
    assert cpu_step.decoder_step(dec, x, starts, lens, (ks, vs), cross, cs[:1], cl) is None  # a row's window missing
