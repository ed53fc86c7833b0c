"""Triton attention kernels vs the torch reference (encdec_fast.ops.attention / varlen_attention).

On a CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small (H=2, B<=4) but awkward: lengths 1, 7, 33, 130; head dims 16, 64, 80, 96, 128.
The varlen (packed) kernel is checked against torch attention run on each sequence alone.
Each output is compared with the reference run in fp32 on the same (rounded) inputs; on CUDA,
fp16/bf16 outputs must also be within 2x (+ a small atol) of the error of the reference run in
that low precision (the flash-attention criterion).
"""

import functools

import pytest
import torch
from kernel_checks import (
    ATTN_DTYPES,
    ATTN_FLASH_ATOL,
    DEVICE,
    ON_CUDA,
    check,
    randn,
)

from encdec_fast import ops
from encdec_fast.kernels import attention as katt

H = 2


DTYPES, FLASH_ATOL = ATTN_DTYPES, ATTN_FLASH_ATOL


def _padding_mask(B, L, *, middle=False):
    """True = attend. Row 0 keeps everything; later rows lose a tail (and, with middle, a gap)."""
    m = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    for b in range(1, B):
        m[b, max(1, L - b * (L // 3 + 1)):] = False
    if middle and L >= 4:
        m[0, L // 4: L // 2 + 1] = False
    return m


_check = functools.partial(check, flash_atol=FLASH_ATOL)


def _run_attention(B, Lq, Lk, D, dtype, atol, rtol, *, causal=False, key_mask=None, fused_kv=False):
    scale = D ** -0.5
    q = randn(B, Lq, H, D, dtype=dtype)
    if fused_kv:  # k, v as strided views into one [B, L, 2, H, D] projection
        kv = randn(B, Lk, 2, H, D, dtype=dtype)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k, v = randn(B, Lk, H, D, dtype=dtype), randn(B, Lk, H, D, dtype=dtype)
    out = katt.attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
    ref32 = ops.attention(q.float(), k.float(), v.float(), scale=scale, causal=causal, key_mask=key_mask)
    ref_lowp = ops.attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask) if ON_CUDA else None
    assert out.dtype == dtype and out.is_contiguous()
    _check(out, ref32, atol, rtol, f"attention B={B} Lq={Lq} Lk={Lk} D={D} causal={causal}", ref_lowp)
    return out


# --------------------------------------------------------------------------------------------
# attention (encoder self-attention, causal prefill, cross-attention)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, L, D", [(1, 1, 16), (2, 7, 64), (2, 33, 80), (1, 130, 96), (1, 33, 32)])
def test_attention_matches_reference_bidirectional(B, L, D, dtype, atol, rtol):
    _run_attention(B, L, L, D, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, L, D, middle", [(3, 7, 16, False), (2, 33, 64, True), (2, 130, 80, False)])
def test_attention_matches_reference_with_key_padding(B, L, D, middle, dtype, atol, rtol):
    _run_attention(B, L, L, D, dtype, atol, rtol, key_mask=_padding_mask(B, L, middle=middle))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, L, D, padded", [(1, 1, 64, False), (2, 7, 96, True), (2, 33, 16, False),
                                             (1, 130, 64, True), (2, 33, 128, True)])
def test_causal_attention_matches_reference(B, L, D, padded, dtype, atol, rtol):
    mask = _padding_mask(B, L) if padded else None
    _run_attention(B, L, L, D, dtype, atol, rtol, causal=True, key_mask=mask)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, Lq, Lk, D", [(2, 7, 33, 64), (2, 33, 7, 80), (1, 1, 130, 96), (2, 130, 7, 16)])
def test_cross_attention_matches_reference_with_encoder_padding(B, Lq, Lk, D, dtype, atol, rtol):
    _run_attention(B, Lq, Lk, D, dtype, atol, rtol, key_mask=_padding_mask(B, Lk), fused_kv=True)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
@pytest.mark.parametrize("Lq, Lk", [(7, 33), (33, 7)])
def test_causal_attention_is_bottom_right_aligned_when_lengths_differ(Lq, Lk, dtype, atol, rtol):
    out = _run_attention(2, Lq, Lk, 64, dtype, atol, rtol, causal=True)
    if Lq > Lk:  # the first Lq - Lk queries see no key at all
        assert (out[:, : Lq - Lk] == 0).all()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_attention_accepts_fused_qkv_views(dtype, atol, rtol):
    B, L, D = 2, 33, 64
    qkv = randn(B, L, 3, H, D, dtype=dtype)  # one fused projection, as the model produces it
    q, k, v = qkv.unbind(2)
    out = katt.attention(q, k, v, scale=0.125, causal=True)
    ref = ops.attention(q.float(), k.float(), v.float(), scale=0.125, causal=True)
    _check(out, ref, atol, rtol, "attention on fused-QKV views")


def test_attention_row_without_visible_key_outputs_zeros():
    B, L, D = 2, 7, 16
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    q, k, v = (randn(B, L, H, D, dtype=torch.float32) for _ in range(3))
    out = katt.attention(q, k, v, scale=0.25, key_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    ref = ops.attention(q, k, v, scale=0.25, key_mask=mask)
    _check(out, ref, 2e-5, 1e-5, "attention with one fully masked batch row")


def test_attention_rejects_bad_inputs():
    q = randn(2, 7, H, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        katt.attention(q, q.half(), q.half(), scale=1.0)
    with pytest.raises(ValueError, match="4-D"):
        katt.attention(q[0], q, q, scale=1.0)
    with pytest.raises(ValueError, match="unit stride"):
        katt.attention(q, q, q.transpose(2, 3), scale=1.0)
    with pytest.raises(ValueError, match="key_mask"):
        katt.attention(q, q, q, scale=1.0, key_mask=torch.ones(2, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="batch"):
        katt.attention(q, q[:1], q[:1], scale=1.0)


# --------------------------------------------------------------------------------------------
# varlen attention (the packed encoder): sequences back to back, cu_seqlens offsets
# --------------------------------------------------------------------------------------------
def _packed_qkv(lengths, D, dtype):
    """q, k, v [T, H, D] as views of one fused [T, 3, H, D] projection (as the model makes them)."""
    qkv = randn(sum(lengths), 3, H, D, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return (*qkv.unbind(1), cu)


def _per_sequence(q, k, v, cu, scale, causal):
    """The reference: ops.attention on each sequence alone, concatenated."""
    b = cu.tolist()
    outs = [ops.attention(q[s:e][None], k[s:e][None], v[s:e][None], scale=scale, causal=causal)[0]
            for s, e in zip(b, b[1:]) if e > s]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("lengths, D, causal", [
    ([1, 7, 33, 130], 64, False), ([130, 1, 33, 7], 80, False), ([7, 33, 1], 128, False),
    ([33, 130, 7, 1], 64, True), ([7, 1, 33], 80, True), ([130, 7], 16, False), ([33, 7, 1], 96, True),
    ([7, 33], 128, True),
])
def test_varlen_attention_matches_per_sequence_reference(lengths, D, causal, dtype, atol, rtol):
    q, k, v, cu = _packed_qkv(lengths, D, dtype)
    s = D ** -0.5
    out = katt.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), scale=s, causal=causal)
    ref32 = _per_sequence(q.float(), k.float(), v.float(), cu, s, causal)
    ref_lowp = _per_sequence(q, k, v, cu, s, causal) if ON_CUDA else None
    assert out.dtype == dtype and out.shape == q.shape
    _check(out, ref32, atol, rtol, f"varlen_attention lengths={lengths} D={D} causal={causal}", ref_lowp)


@pytest.mark.parametrize("lengths", [[1, 7, 33, 130], [33, 33, 33], [0, 7, 0, 33, 0], [5]])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_reference_matches_per_sequence_attention(lengths, causal):
    """ops.varlen_attention (the torch backend's op): per-sequence SDPA, or one batch when lengths are equal."""
    q, k, v, cu = _packed_qkv(lengths, 64, torch.float32)
    out = ops.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), scale=0.125, causal=causal)
    _check(out, _per_sequence(q, k, v, cu, 0.125, causal), 2e-6, 1e-6, f"ops.varlen_attention {lengths}")


def test_varlen_attention_skips_empty_sequences_and_overlong_max_seqlen():
    q, k, v, cu = _packed_qkv([0, 7, 0, 33, 0], 64, torch.float32)
    out = katt.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=100, scale=0.125)
    _check(out, _per_sequence(q, k, v, cu, 0.125, False), 2e-5, 1e-5, "varlen_attention with empty sequences")


def test_varlen_attention_sequence_output_does_not_depend_on_the_others():
    """Batch invariance at the kernel: a sequence packed with others gives what it gives alone."""
    lengths = [33, 7, 130]
    q, k, v, cu = _packed_qkv(lengths, 64, torch.float32)
    together = katt.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=130, scale=0.125)
    for b, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        one = torch.tensor([0, e - s], dtype=torch.int32, device=DEVICE)
        alone = katt.varlen_attention(q[s:e], k[s:e], v[s:e], cu_seqlens=one, max_seqlen=130, scale=0.125)
        assert torch.equal(together[s:e], alone), f"sequence {b}: max diff {(together[s:e] - alone).abs().max():.3e}"


@pytest.mark.parametrize("tiles", [(64, 32, 4, 2), (128, 64, 8, 2)])
def test_attention_tile_overrides_give_the_same_result(tiles):
    """benchmarks/bench_kernels.py --tiles times other tiles: they must compute the same thing."""
    q, k, v, cu = _packed_qkv([7, 130, 33], 80, torch.float16)
    s = 80 ** -0.5
    out = katt.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=130, scale=s, causal=True, tiles=tiles)
    _check(out, _per_sequence(q.float(), k.float(), v.float(), cu, s, True), 2e-3, 2e-3, f"varlen tiles={tiles}")
    qb, kb, vb = (t[:130].unflatten(0, (2, 65)) for t in (q, k, v))
    out = katt.attention(qb, kb, vb, scale=s, tiles=tiles)
    _check(out, ops.attention(qb.float(), kb.float(), vb.float(), scale=s), 2e-3, 2e-3, f"attention tiles={tiles}")


def test_varlen_attention_rejects_bad_inputs():
    q, k, v, cu = _packed_qkv([7, 9], 16, torch.float32)
    kw = dict(max_seqlen=9, scale=1.0)
    with pytest.raises(ValueError, match="3-D"):
        katt.varlen_attention(q[None], k, v, cu_seqlens=cu, **kw)
    with pytest.raises(ValueError, match="int32"):
        katt.varlen_attention(q, k, v, cu_seqlens=cu.long(), **kw)
    with pytest.raises(ValueError, match="tokens"):
        katt.varlen_attention(q, k[:8], v[:8], cu_seqlens=cu, **kw)
    with pytest.raises(ValueError, match="max_seqlen"):
        katt.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=9.0, scale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        katt.varlen_attention(q, k.half(), v.half(), cu_seqlens=cu, **kw)
