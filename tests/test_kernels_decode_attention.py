"""Packed decode-attention kernel vs the torch reference (encdec_fast.ops.decode_attention), and the
reference vs a per-row loop that states the definition.

On a CPU the kernel runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small (H=2) but awkward: cache lengths 1, 7, 33, 130; head dims 16, 64, 80, 96; row counts
that leave a program's 16-row group part empty or spill into a second group. Each output is compared
with the reference run in fp32 on the same (rounded) inputs; on CUDA, fp16/bf16 outputs must also be
within 2x (+ a small atol) of the error of the reference run in that low precision.
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
    needs_cuda,
    randn,
)

from encdec_fast import ops
from encdec_fast.kernels import decode_attention as kdec

H = 2

DTYPES, FLASH_ATOL = ATTN_DTYPES, ATTN_FLASH_ATOL
_check = functools.partial(check, flash_atol=FLASH_ATOL)


def _ints(values, dtype=torch.int32):
    return torch.as_tensor(values, dtype=dtype, device=DEVICE)


def _naive(q, k, v, scale, starts, lens, key_mask=None):
    """The definition, one row at a time, in fp32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for n, (s, ln) in enumerate(zip(starts.tolist(), lens.tolist())):
        keys = torch.arange(s, s + ln, device=q.device)
        if key_mask is not None:
            keys = keys[key_mask[keys]]
        if len(keys):
            w = torch.softmax(torch.einsum("hd,thd->ht", q[n].float(), k[keys].float()) * scale, dim=-1)
            out[n] = torch.einsum("ht,thd->hd", w, v[keys].float())
    return out


def _compare(q, k, v, dtype, atol, rtol, what, num_splits=None, **kw):
    """Kernel vs the fp32 reference (and, on CUDA, the reference in dtype); returns the kernel output.
    With k_new/v_new the kernel writes k/v in place: each side gets its own copy of the cache, and the
    caches must agree exactly afterwards."""
    k_ref, v_ref = k.float().clone(), v.float().clone()
    new32 = {n: kw[n].float() for n in ("k_new", "v_new") if kw.get(n) is not None}
    ref_lowp = None
    if ON_CUDA:
        ref_lowp = ops.decode_attention(q, k.clone(), v.clone(), scale=kw["scale"], **{
            n: x for n, x in kw.items() if n != "scale"})
    out = kdec.decode_attention(q, k, v, num_splits=num_splits, **kw)
    ref32 = ops.decode_attention(q.float(), k_ref, v_ref, **(kw | new32))
    assert out.dtype == dtype and out.is_contiguous()
    _check(out, ref32, atol, rtol, what, ref_lowp)
    if new32:
        assert torch.equal(k.float(), k_ref) and torch.equal(v.float(), v_ref), f"{what}: cache write differs"
    return out


# --------------------------------------------------------------------------------------------
# self-attention over a cache, K/V of this step written by the kernel
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, Lmax, D, lens, num_splits", [
    (1, 1, 16, [1], None),
    (3, 7, 64, [7, 1, 4], None),
    (2, 33, 80, [33, 20], 1),  # unsplit
    (3, 130, 96, [130, 64, 3], 3),  # split; one row ends inside the first split
])
def test_self_attention_writes_new_kv_and_matches_reference(N, Lmax, D, lens, num_splits, dtype, atol, rtol):
    cache_k, cache_v = randn(N, Lmax, H, D, dtype=dtype), randn(N, Lmax, H, D, dtype=dtype)
    k, v = cache_k.view(N * Lmax, H, D), cache_v.view(N * Lmax, H, D)  # the flat key rows, same memory
    starts = _ints([n * Lmax for n in range(N)])
    lens = _ints(lens)
    q, k_new, v_new = (randn(N, H, D, dtype=dtype) for _ in range(3))
    _compare(q, k, v, dtype, atol, rtol, f"self N={N} Lmax={Lmax} D={D} splits={num_splits}", num_splits,
             scale=D ** -0.5, starts=starts, lens=lens, k_new=k_new, v_new=v_new)
    rows = torch.arange(N, device=DEVICE)
    assert torch.equal(cache_k[rows, lens.long() - 1], k_new)  # written at slot starts + lens - 1 ...
    assert torch.equal(cache_v[rows, lens.long() - 1], v_new)


def test_self_attention_over_two_row_groups_with_strided_cache():
    """17 rows: two 16-row programs; a cut (rows, :Lmax) of a longer cache (row stride 12 keys, not 9)
    and new K/V that are strided views of a fused projection."""
    N, Lcap, Lmax, D = 17, 12, 9, 16
    full_k, full_v = randn(N, Lcap, H, D), randn(N, Lcap, H, D)
    k = full_k.as_strided((N * Lcap, H, D), (H * D, D, 1))
    v = full_v.as_strided((N * Lcap, H, D), (H * D, D, 1))
    qkv = randn(N, 3, H, D)
    lens = _ints([(3 * n) % Lmax + 1 for n in range(N)], torch.int64)
    out = _compare(qkv[:, 0], k, v, torch.float32, 2e-5, 1e-5, "17 rows", 2, scale=0.25,
                   starts=_ints([n * Lcap for n in range(N)], torch.int64), lens=lens,
                   k_new=qkv[:, 1], v_new=qkv[:, 2])
    assert out.shape == (N, H, D)


# --------------------------------------------------------------------------------------------
# cross-attention: padded encoder rows (mask) or packed per request, rows sharing windows
# --------------------------------------------------------------------------------------------
def _padding_mask(B, S, *, middle=False):
    """True = attend. Row 0 keeps everything (with middle: but a gap); later rows lose a tail."""
    m = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    for b in range(1, B):
        m[b, max(1, S - b * (S // 3 + 1)):] = False
    if middle and S >= 4:
        m[0, S // 4: S // 2 + 1] = False
    return m


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("S, D, num_splits", [(7, 16, None), (130, 64, 1), (130, 80, 2)])
def test_cross_attention_padded_with_shared_rows_and_mask(S, D, num_splits, dtype, atol, rtol):
    B, beams = 2, 3  # 2 inputs x 3 beams: a beam's window is its input's row of the padded K/V
    k, v = randn(B * S, H, D, dtype=dtype), randn(B * S, H, D, dtype=dtype)
    kv_row = torch.arange(B, device=DEVICE).repeat_interleave(beams)
    mask = _padding_mask(B, S, middle=True)
    q = randn(B * beams, H, D, dtype=dtype)
    _compare(q, k, v, dtype, atol, rtol, f"cross S={S} D={D} splits={num_splits}", num_splits, scale=D ** -0.5,
             starts=(kv_row * S).to(torch.int32), lens=_ints([S] * (B * beams)), key_mask=mask.reshape(-1))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_cross_attention_packed_per_request_rows_in_any_order(num_splits):
    """Requests of 5, 40 and 17 tokens packed back to back; their rows (beams) interleaved out of
    order, so a program's group holds windows that repeat, start earlier, or follow."""
    lengths, D = [5, 40, 17], 16
    offsets = [0, 5, 45]
    k, v = randn(sum(lengths), H, D), randn(sum(lengths), H, D)
    req = [1, 1, 0, 2, 2, 2, 0, 1]
    q = randn(len(req), H, D)
    _compare(q, k, v, torch.float32, 2e-5, 1e-5, f"packed splits={num_splits}", num_splits, scale=0.3,
             starts=_ints([offsets[r] for r in req]), lens=_ints([lengths[r] for r in req]))


def test_partially_overlapping_windows_are_each_counted_once():
    """Windows that overlap without one covering the other, in both orders (the group falls back to
    one segment per row) and a window nested inside an earlier one."""
    k, v = randn(50, H, 16), randn(50, H, 16)
    starts, lens = _ints([10, 0, 5, 30, 12]), _ints([5, 40, 30, 20, 2])
    for splits in (1, 2):
        _compare(randn(5, H, 16), k, v, torch.float32, 2e-5, 1e-5, f"overlap splits={splits}", splits,
                 scale=0.5, starts=starts, lens=lens)


# --------------------------------------------------------------------------------------------
# splits, index types, empty rows, the split count, errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_matches_unsplit(num_splits):
    N, Lmax, D = 2, 130, 32
    q, k, v = randn(N, H, D), randn(N * Lmax, H, D), randn(N * Lmax, H, D)
    kw = dict(scale=0.2, starts=_ints([0, Lmax]), lens=_ints([130, 40]))
    one = kdec.decode_attention(q, k, v, num_splits=1, **kw)
    many = kdec.decode_attention(q, k, v, num_splits=num_splits, **kw)
    _check(many, one, 1e-5, 1e-5, f"split {num_splits} vs unsplit")


def test_accepts_int64_indices_and_integer_mask():
    B, S, D = 2, 33, 16
    mask = _padding_mask(B, S).to(torch.int64).reshape(-1)  # 1/0 like a tokenizer's attention_mask
    k, v = randn(B * S, H, D), randn(B * S, H, D)
    _compare(randn(3, H, D), k, v, torch.float32, 2e-5, 1e-5, "int64", None, scale=0.25,
             starts=_ints([S, S, 0], torch.int64), lens=_ints([S, 9, S], torch.int64), key_mask=mask)


def test_row_without_visible_key_outputs_zeros():
    k, v = randn(40, H, 16), randn(40, H, 16)
    mask = torch.ones(40, dtype=torch.bool, device=DEVICE)
    mask[20:30] = False
    q = randn(3, H, 16)
    out = _compare(q, k, v, torch.float32, 2e-5, 1e-5, "empty rows", 2, scale=0.25,
                   starts=_ints([0, 20, 5]), lens=_ints([0, 10, 30]), key_mask=mask)
    assert (out[:2] == 0).all() and (out[2] != 0).any()


def test_reference_matches_the_definition_strided_and_gathered():
    """ops.decode_attention (a strided view for evenly spaced windows, a gather otherwise) against the
    per-row loop. (Its CUDA path, windows sized by max_len, runs in the CUDA graph test.)"""
    k, v, q = randn(60, H, 16), randn(60, H, 16), randn(4, H, 16)
    mask = torch.rand(60, device=DEVICE) > 0.2
    for starts, lens in (([0, 15, 30, 45], [15, 3, 9, 1]), ([30, 0, 30, 7], [20, 15, 12, 0]), ([5] * 4, [30] * 4)):
        st, ln = _ints(starts), _ints(lens)
        got = ops.decode_attention(q, k, v, scale=0.3, starts=st, lens=ln, key_mask=mask, max_len=30)
        _check(got, _naive(q, k, v, 0.3, st, ln, mask), 2e-6, 1e-5, f"reference starts={starts}")


def test_split_count_depends_only_on_shapes():
    cpu = torch.device("cpu")  # off CUDA the launcher assumes an H100's 132 SMs
    assert kdec.decode_splits(256 * 16, 12, 256 * 16 * 640, 64, cpu) == 1  # programs fill the GPU
    few = kdec.decode_splits(64, 12, 64 * 640, 64, cpu)  # 4 groups x 12 heads = 48 programs
    assert 1 < few <= kdec.MAX_SPLITS and 48 * few >= kdec.PROGRAMS_PER_SM * 132
    assert kdec.decode_splits(1, 12, 640, 64, cpu) == 10  # one split per 64-key tile of the 640
    assert kdec.decode_splits(1, 12, 7, 64, cpu) == 1  # too short to split


def test_rejects_bad_inputs():
    q, k = randn(2, H, 16), randn(14, H, 16)
    st, ln = _ints([0, 7]), _ints([7, 7])
    call = functools.partial(kdec.decode_attention, q, k, k, scale=1.0)
    with pytest.raises(ValueError, match="lens"):
        call(starts=st, lens=ln.float())
    with pytest.raises(ValueError, match="starts"):
        call(starts=st[:1], lens=ln)
    with pytest.raises(ValueError, match="3-D"):
        kdec.decode_attention(q, k[None], k[None], scale=1.0, starts=st, lens=ln)
    with pytest.raises(ValueError, match="key_mask"):
        call(starts=st, lens=ln, key_mask=torch.ones(13, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="together"):
        call(starts=st, lens=ln, k_new=q)
    with pytest.raises(ValueError, match="k_new"):
        call(starts=st, lens=ln, k_new=q[:1], v_new=q[:1])
    with pytest.raises(ValueError, match="num_splits"):
        call(starts=st, lens=ln, num_splits=0)


# --------------------------------------------------------------------------------------------
# CUDA only: graph capture (lens read on the device, split counters self-resetting), many splits
# --------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_graph_replays_with_new_lengths_and_writes_cache(num_splits):
    N, Lmax, D = 3, 130, 64
    dt = torch.float16
    cache_k, cache_v = randn(N, Lmax, H, D, dtype=dt), randn(N, Lmax, H, D, dtype=dt)
    k, v = cache_k.view(-1, H, D), cache_v.view(-1, H, D)
    q, k_new, v_new = (randn(N, H, D, dtype=dt) for _ in range(3))
    starts = _ints([n * Lmax for n in range(N)])
    lens = torch.full((N,), 5, dtype=torch.int32, device=DEVICE)

    def run():
        return kdec.decode_attention(q, k, v, scale=0.125, starts=starts, lens=lens, k_new=k_new, v_new=v_new,
                                     num_splits=num_splits)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for n in (1, 77, Lmax, Lmax):  # new lengths written in place, no re-capture; the same twice
        lens.fill_(n)
        lens[0] = max(1, n // 2)
        k_ref, v_ref = k.float().clone(), v.float().clone()
        graph.replay()
        ref = ops.decode_attention(q.float(), k_ref, v_ref, scale=0.125, starts=starts, lens=lens,
                                   k_new=k_new.float(), v_new=v_new.float(), max_len=Lmax)
        _check(out, ref, 2e-3, 2e-3, f"graph replay with lens {lens.tolist()}")
        assert torch.equal(k.float(), k_ref)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_many_splits_merge_correctly_on_the_gpu(dtype):
    """Sixteen splits of one long window per head merge through the atomic counter; repeated, so a
    missing memory fence between the partials and the merge would show."""
    T, D = 4096, 64
    k, v, q = randn(T, H, D, dtype=dtype), randn(T, H, D, dtype=dtype), randn(2, H, D, dtype=dtype)
    kw = dict(scale=0.125, starts=_ints([0, 1000]), lens=_ints([T, 2000]))
    ref = ops.decode_attention(q.float(), k.float(), v.float(), **kw)
    for _ in range(20):
        out = kdec.decode_attention(q, k, v, num_splits=16, **kw)
        _check(out, ref, 1.6e-2, 1.6e-2, f"16 splits {dtype}")
