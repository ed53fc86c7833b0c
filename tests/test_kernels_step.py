"""The decode step's two small kernels against their torch references, under the interpreter on the
CPU: the embeddings of the fed tokens (kernels/embed.py vs ops.embed_step: every family's options,
awkward widths) and the one pass over the logits (kernels/scan.py vs dops.scan_logits: argmax with
ties across and within blocks, NaN/inf rows, running and stopped rows)."""

import pytest
import torch
from kernel_checks import DEVICE, bf16_needs_cuda

from encdec_fast import ops
from encdec_fast.decode import ops as dops
from encdec_fast.kernels import embed as kembed
from encdec_fast.kernels import scan as kscan

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_cuda)]

# (width E, scale, token types, skip_pad (roberta positions), LayerNorm): gpt2, bert, bart, roberta-like
FAMILIES = [(24, 1.0, False, False, False), (33, 1.0, True, False, True), (48, 48 ** 0.5, False, False, True),
            (7, 1.0, True, True, True), (130, 1.0, False, False, False)]


def _tables(E, dtype, types, ln, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    return dict(word=r(50, E), position=r(40, E), type0=r(3, E)[0] if types else None,
                ln=(1 + 0.1 * r(E), r(E), 1e-5) if ln else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E, scale, types, skip_pad, ln", FAMILIES)
@pytest.mark.parametrize("N", [1, 5])
def test_embed_step_matches_reference(dtype, E, scale, types, skip_pad, ln, N):
    g = torch.Generator().manual_seed(N + E)
    Lc = 9
    seq = torch.randint(0, 50, (N + 2, Lc), generator=g).to(DEVICE)[:N]  # a view with row stride Lc
    t = torch.randint(1, Lc + 1, (N,), generator=g).to(DEVICE)
    seq[0, t[0] - 1] = 1  # the pad id: with skip_pad it takes position row pad_id
    kw = dict(scale=scale, offset=2 if skip_pad else 0, pad_id=1, skip_pad=skip_pad, row_stride=11)
    tab = _tables(E, dtype, types, ln, E)
    want = ops.embed_step(seq, t, tab["word"], tab["position"], tab["type0"], ln=tab["ln"], **kw)
    got = kembed.embed_step(seq, t, tab["word"], tab["position"], tab["type0"], ln=tab["ln"], **kw)
    if ln:  # a LayerNorm: the same two-pass formula, summed in another order
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got[0], want[0], **tol)
    else:  # the adds, rounded to the table dtype after each as the reference's ops round them: bit for bit
        assert torch.equal(got[0], want[0])
    assert got[0].dtype == dtype
    assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int32
    assert torch.equal(got[2], want[2]) and torch.equal(got[2].cpu(), torch.arange(N) * 11)


def test_embed_step_no_rows_and_bad_inputs():
    tab = _tables(8, torch.float32, False, False, 0)
    x, lens, starts = kembed.embed_step(torch.zeros(0, 3, dtype=torch.long, device=DEVICE),
                                        torch.zeros(0, dtype=torch.long, device=DEVICE), tab["word"], tab["position"],
                                        None, scale=1.0, offset=0, pad_id=0, skip_pad=False, ln=None, row_stride=3)
    assert x.shape == (0, 8) and lens.shape == starts.shape == (0,)
    with pytest.raises(ValueError, match="int64"):
        kembed.embed_step(torch.zeros(1, 3, dtype=torch.int32, device=DEVICE), torch.ones(1, dtype=torch.long,
                          device=DEVICE), tab["word"], tab["position"], None, scale=1.0, offset=0, pad_id=0,
                          skip_pad=False, ln=None, row_stride=3)


def _rows(N, V, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g).mul(3).round()  # rounded: equal maxima within and across blocks
    if V > 4:
        logits[0, V // 2] = logits[0].max() + 1
        logits[0, V - 1] = logits[0, V // 2]  # a tie: the first index wins
    busy = torch.rand(N, generator=g) < 0.8
    stop = torch.where(torch.rand(N, generator=g) < 0.3, torch.randint(1, 5, (N,), generator=g), 0)
    bad = torch.rand(N, generator=g) < 0.2
    for n in range(1, N, 2):  # NaN, +inf, -inf in turn in every other row
        logits[n, (n * 7) % V] = (float("nan"), float("inf"), float("-inf"))[(n // 2) % 3]
    if N > 3:
        logits[3, :] = float("-inf")
    return [x.to(DEVICE) for x in (logits.to(dtype), busy, stop, bad)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V", [(1, 1), (1, 7), (4, 4097), (9, 5000), (2, 8192), (5, 100)])
def test_scan_logits_matches_reference(dtype, N, V):
    for argmax in (True, False):
        logits, busy, stop, bad_ref = _rows(N, V, N * V, dtype)
        bad_got = bad_ref.clone()
        want = dops.scan_logits(logits, busy, stop, bad_ref, argmax=argmax)
        got = kscan.scan_logits(logits, busy, stop, bad_got, argmax=argmax)
        assert torch.equal(bad_got, bad_ref)
        if not argmax:
            assert got is None and want is None
            continue
        clean = ~torch.isnan(logits.float()).any(-1)
        assert torch.equal(got[clean], want[clean])
        assert bool(((got >= 0) & (got < V)).all())


def test_scan_flags_only_running_rows():
    logits = torch.tensor([[0.0, float("nan")], [float("inf"), 1.0], [1.0, 2.0], [float("nan"), 0.0]], device=DEVICE)
    busy = torch.tensor([True, True, True, False], device=DEVICE)
    stop = torch.tensor([0, 3, 0, 0], device=DEVICE)
    bad = torch.tensor([False, False, False, False], device=DEVICE)
    tok = kscan.scan_logits(logits, busy, stop, bad, argmax=True)
    assert bad.tolist() == [True, False, False, False]  # row 1 has stopped, row 3 is idle
    assert tok[2].item() == 1
    with pytest.raises(ValueError, match="stop_t"):
        kscan.scan_logits(logits, busy, stop.int(), bad, argmax=False)
