"""Triton decode-attention kernel vs the torch reference (encdec_fast.ops.decode_attention).

On a CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small (H=2, B<=3) but awkward: lengths 1, 7, 33, 130; head dims 16, 64, 80, 96.
Each output is compared with the reference run in fp32 on the same (rounded) inputs; on CUDA,
fp16/bf16 outputs must also be within 2x (+ a small atol) of the error of the reference run in
that low precision (the flash-attention criterion).
"""

import functools

import pytest
import torch
from encdec_fast.kernels import decode_attention as kdec
from kernel_checks import DEVICE, ON_CUDA, bf16_needs_cuda, check, needs_cuda

from encdec_fast import ops

H = 2


# (dtype, atol, rtol) against the fp32 reference
DTYPES = [
    pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16", marks=bf16_needs_cuda),
]
FLASH_ATOL = {torch.float16: 5e-4, torch.bfloat16: 4e-3}  # slack of the 2x criterion


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def _padding_mask(B, L, *, middle=False):
    """True = attend. Row 0 keeps everything; later rows lose a tail (and, with middle, a gap)."""
    m = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    for b in range(1, B):
        m[b, max(1, L - b * (L // 3 + 1)):] = False
    if middle and L >= 4:
        m[0, L // 4: L // 2 + 1] = False
    return m


_check = functools.partial(check, flash_atol=FLASH_ATOL)


# --------------------------------------------------------------------------------------------
# decode attention (one query per row over a cache)
# --------------------------------------------------------------------------------------------
def _run_decode(N, Bk, Lmax, D, dtype, atol, rtol, *, seq_lens, kv_index=None, key_mask=None, num_splits=None):
    scale = D ** -0.5
    q = _randn(N, H, D, dtype=dtype)
    k, v = _randn(Bk, Lmax, H, D, dtype=dtype), _randn(Bk, Lmax, H, D, dtype=dtype)
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = dict(scale=scale, seq_lens=seq_lens, kv_index=kv_index, key_mask=key_mask)
    out = kdec.decode_attention(q, k, v, num_splits=num_splits, **kw)
    ref32 = ops.decode_attention(q.float(), k.float(), v.float(), **kw)
    ref_lowp = ops.decode_attention(q, k, v, **kw) if ON_CUDA else None
    assert out.dtype == dtype and out.is_contiguous()
    _check(out, ref32, atol, rtol, f"decode N={N} Lmax={Lmax} D={D} splits={num_splits}", ref_lowp)
    return out


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, Lmax, D, seq_lens, num_splits", [
    (1, 1, 16, [1], None),
    (3, 7, 64, [7, 1, 4], None),
    (2, 33, 80, [33, 20], 1),  # unsplit
    (3, 130, 96, [130, 64, 3], 3),  # split, one row ends inside the first split
])
def test_decode_attention_matches_reference_with_ragged_lengths(N, Lmax, D, seq_lens, num_splits, dtype, atol, rtol):
    _run_decode(N, N, Lmax, D, dtype, atol, rtol, seq_lens=seq_lens, num_splits=num_splits)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("Lk, D, num_splits", [(7, 16, None), (130, 64, 1), (130, 80, 2)])
def test_decode_cross_attention_matches_reference_with_shared_rows_and_padding(Lk, D, num_splits, dtype, atol, rtol):
    Bk, beams = 2, 3  # 2 inputs x 3 beams: beams share their input's encoder K/V row
    kv_index = torch.arange(Bk, device=DEVICE).repeat_interleave(beams)
    key_mask = _padding_mask(Bk, Lk, middle=True)
    _run_decode(Bk * beams, Bk, Lk, D, dtype, atol, rtol, seq_lens=[Lk] * (Bk * beams), kv_index=kv_index,
                key_mask=key_mask, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_attention_split_matches_unsplit(num_splits):
    torch.manual_seed(0)
    N, Lmax, D = 2, 130, 32
    q = _randn(N, H, D, dtype=torch.float32)
    k, v = _randn(N, Lmax, H, D, dtype=torch.float32), _randn(N, Lmax, H, D, dtype=torch.float32)
    lens = torch.tensor([130, 40], dtype=torch.int32, device=DEVICE)
    one = kdec.decode_attention(q, k, v, scale=0.2, seq_lens=lens, num_splits=1)
    many = kdec.decode_attention(q, k, v, scale=0.2, seq_lens=lens, num_splits=num_splits)
    _check(many, one, 1e-5, 1e-5, f"decode split {num_splits} vs unsplit")


def test_decode_attention_accepts_int64_indices_and_integer_mask():
    Bk, Lk, D = 2, 33, 16
    kv_index = torch.tensor([1, 1, 0], dtype=torch.int64, device=DEVICE)
    mask = _padding_mask(Bk, Lk).to(torch.int64)  # 1/0 like a tokenizer's attention_mask
    _run_decode(3, Bk, Lk, D, torch.float32, 2e-5, 1e-5, seq_lens=[Lk, 9, Lk], kv_index=kv_index, key_mask=mask)


def test_decode_attention_row_without_visible_key_outputs_zeros():
    out = _run_decode(2, 2, 33, 16, torch.float32, 2e-5, 1e-5, seq_lens=[0, 33], num_splits=2)
    assert (out[0] == 0).all()


def test_decode_split_count_depends_only_on_shapes():
    cpu = torch.device("cpu")  # off CUDA the launcher assumes an H100's 132 SMs
    assert kdec._decode_splits(64 * 12, 640, 64, cpu) == 1  # enough (row, head) programs already
    few = kdec._decode_splits(1 * 12, 640, 64, cpu)
    assert 1 < few <= 640 // 64  # split, each split at least one key block
    assert kdec._decode_splits(12, 7, 64, cpu) == 1  # too short to split


def test_decode_attention_rejects_bad_inputs():
    q = _randn(2, H, 16, dtype=torch.float32)
    k = _randn(2, 7, H, 16, dtype=torch.float32)
    lens = torch.tensor([7, 7], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="seq_lens"):
        kdec.decode_attention(q, k, k, scale=1.0, seq_lens=lens.float())
    with pytest.raises(ValueError, match="kv_index"):
        kdec.decode_attention(q, k[:1], k[:1], scale=1.0, seq_lens=lens)
    with pytest.raises(ValueError, match="3-D"):
        kdec.decode_attention(q[None], k, k, scale=1.0, seq_lens=lens)
    with pytest.raises(ValueError, match="key_mask"):
        kdec.decode_attention(q, k, k, scale=1.0, seq_lens=lens, key_mask=torch.ones(2, 6, dtype=torch.bool))


@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_is_cuda_graph_capturable(num_splits):
    N, Lmax, D = 3, 130, 64
    q = _randn(N, H, D, dtype=torch.float16)
    k, v = _randn(N, Lmax, H, D, dtype=torch.float16), _randn(N, Lmax, H, D, dtype=torch.float16)
    lens = torch.full((N,), 5, dtype=torch.int32, device=DEVICE)
    run = lambda: kdec.decode_attention(q, k, v, scale=0.125, seq_lens=lens, num_splits=num_splits)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile) outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for n in (1, 77, Lmax):  # new lengths written in place, no re-capture
        lens.fill_(n)
        lens[0] = max(1, n // 2)
        graph.replay()
        ref = ops.decode_attention(q.float(), k.float(), v.float(), scale=0.125, seq_lens=lens)
        _check(out, ref, 2e-3, 2e-3, f"graph replay with seq_lens {lens.tolist()}")
