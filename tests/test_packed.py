"""The packed encoder: padding dropped before the embeddings, every encoder op on the real tokens.

Checked against transformers itself on padded batches whose rows differ in length (right and left
padding, holes), on the torch backend and the Triton kernels (the interpreter on a CPU); the
packed cross-attention K/V; and batch invariance (a row's outputs do not depend on the other rows)."""

import pytest
import torch
from conftest import DEVICE, hf_model
from test_parity import rel_err

import encdec_fast
from encdec_fast.packing import Packing

pytestmark = pytest.mark.usefixtures("quiet")

LENGTHS = [13, 1, 7, 10]  # rows of one batch: the longest first, a single-token row


def batch(vocab, pad, *, layout="right", lengths=LENGTHS, T=6, seed=0):
    """ids, mask (B, S) with rows of `lengths` real tokens laid out right- or left-padded, or with holes
    (padding inside the row); decoder ids (B, T). Real ids avoid the pad id (RoBERTa positions skip it)."""
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), max(lengths)
    ids = torch.randint(4, vocab, (B, S), generator=g)
    ids[ids == pad] = 5
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        if layout == "right":
            mask[b, :n] = 1
        elif layout == "left":
            mask[b, S - n:] = 1
        else:  # holes: every other padding position sits inside the row
            keep = torch.randperm(S, generator=g)[:n] if n < S else torch.arange(S)
            mask[b, keep] = 1
    ids = ids.masked_fill(mask == 0, pad)
    dec = torch.randint(4, vocab, (B, T), generator=g)
    return ids, mask, dec


def test_packing_round_trip_offsets_and_rows():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    p = Packing.from_mask(mask, 3, 4, "cpu")
    assert p.lengths == (2, 2, 4) and p.total == 8 and p.max_seqlen == 4
    assert p.cu_seqlens.tolist() == [0, 2, 4, 8] and p.cu_seqlens.dtype == torch.int32
    x = torch.arange(12).view(3, 4) + 100
    assert p.pack(x).tolist() == [100, 101, 105, 107, 108, 109, 110, 111]
    back = p.unpack(p.pack(x))
    assert torch.equal(back, x.masked_fill(~mask, 0))
    row, offset = p.rows_and_offsets()
    assert row.tolist() == [0, 0, 1, 1, 2, 2, 2, 2] and offset.tolist() == [0, 1, 0, 1, 0, 1, 2, 3]
    full = Packing.from_mask(None, 2, 3, "cpu")
    assert full.cu_seqlens.tolist() == [0, 3, 6] and full.index is None
    y = torch.randn(2, 3, 5)
    assert full.pack(y).data_ptr() == y.data_ptr() and torch.equal(full.unpack(full.pack(y)), y)


def _compare_with_transformers(path, layout, *, backend="torch", new_tokens=5):
    ref = hf_model(path)
    ours = encdec_fast.load(path, device=DEVICE, backend=backend)
    pad = ref.config.encoder.pad_token_id
    ids, mask, dec = batch(ref.config.encoder.vocab_size, pad, layout=layout)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    o = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    real = mask.bool()
    e_logits = rel_err(o.logits, r.logits)
    e_enc = rel_err(o.encoder_last_hidden_state, r.encoder_last_hidden_state, real)
    assert e_logits < 1e-5, f"logits rel err {e_logits:.3e}"
    assert e_enc < 1e-5, f"encoder hidden rel err at real positions {e_enc:.3e}"
    assert (o.encoder_last_hidden_state.cpu()[~real] == 0).all(), "padding positions are zeroed"
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False).cpu()
    assert torch.equal(got, want), f"\nours {got}\ntransformers {want}"


@pytest.mark.parametrize("enc,dec", [("bert", "gpt2"), ("roberta", "roberta"), ("bert", "bert")])
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_packed_encoder_matches_transformers_on_rows_of_different_lengths(make_ckpt, enc, dec, layout):
    """fp32 logits within 1e-5 (relative to the largest), greedy tokens identical; RoBERTa's
    padding-offset positions included (left padding shifts them)."""
    _compare_with_transformers(make_ckpt(enc, dec), layout)


@pytest.mark.parametrize("enc,dec,layout", [("bert", "gpt2", "right"), ("roberta", "roberta", "left")])
def test_packed_encoder_on_triton_kernels_matches_transformers(make_ckpt, enc, dec, layout):
    _compare_with_transformers(make_ckpt(enc, dec), layout, backend="triton", new_tokens=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_encode_packed_holds_the_real_rows_of_encode(make_ckpt, backend):
    ours = encdec_fast.load(make_ckpt("roberta", "roberta"), device=DEVICE, backend=backend)
    ids, mask, _ = batch(97, 1, layout="left")
    hidden, packing = ours.encode_packed(ids, mask)
    assert hidden.shape == (sum(LENGTHS), ours.cfg.encoder.hidden_size)
    assert packing.lengths == tuple(LENGTHS) and packing.cu_seqlens.tolist() == [0, 13, 14, 21, 31]
    padded, enc_mask = ours.encode(ids, mask)
    assert torch.equal(enc_mask.cpu(), mask.bool())
    assert torch.equal(packing.pack(padded), hidden)


def test_cross_kv_of_packed_states_equals_the_padded_projection_at_real_positions(make_ckpt):
    ours = encdec_fast.load(make_ckpt("bert", "gpt2", enc_hidden=32, dec_hidden=48), device=DEVICE)
    g, ops = ours.net, ours.ops
    ids, mask, _ = batch(97, 0)
    hidden, packing = ours.encode_packed(ids, mask)
    packed = g.decoder.cross_kv(g.project(hidden, ops), ops)
    padded = g.decoder.cross_kv(g.project(packing.unpack(hidden), ops), ops)
    H, D = ours.cfg.decoder.num_heads, ours.cfg.decoder.head_dim
    assert len(packed) == ours.cfg.decoder.num_layers
    for (k, v), (kp, vp) in zip(packed, padded):
        assert k.shape == v.shape == (packing.total, H, D)
        torch.testing.assert_close(k, packing.pack(kp), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v, packing.pack(vp), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_rows_outputs_do_not_depend_on_the_other_rows(make_ckpt, backend):
    """Batch invariance: each row run alone gives its encoder states and logits in the batch (fp32,
    to rounding; the packed encoder never sees the other rows or their padding), and, on the torch
    backend, its greedy tokens."""
    ours = encdec_fast.load(make_ckpt("roberta", "roberta"), device=DEVICE, backend=backend)
    ids, mask, dec = batch(97, 1)
    hidden, packing = ours.encode_packed(ids, mask)
    logits = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    greedy = backend == "torch"
    if greedy:
        tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    cu = packing.cu_seqlens.tolist()
    for b, n in enumerate(LENGTHS):
        one_ids, one_dec = ids[b:b + 1, :n], dec[b:b + 1]
        alone, _ = ours.encode_packed(one_ids)
        # fp32 rounding only (matmuls over T tokens may block differently); a leak between rows is O(0.1)
        torch.testing.assert_close(hidden[cu[b]:cu[b + 1]], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[b:b + 1], ours(one_ids, decoder_input_ids=one_dec).logits,
                                   rtol=1e-5, atol=1e-5)
        if greedy:
            solo = ours.generate(one_ids, max_new_tokens=4, do_sample=False)
            assert torch.equal(tokens[b:b + 1], solo), (b, tokens[b], solo)
