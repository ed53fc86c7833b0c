"""The csrc/ CUDA kernels against their torch references, on a GPU (skipped elsewhere: owed there).

  select_greedy identical tokens to dops.select_greedy (decode/select.py's process over RowTables + argmax):
                every processor, rows with their own settings and lengths, ties, NaN, misaligned rows
  select_beam   identical candidates to dops.select_beam (log-softmax, process, running scores, torch.topk:
                what decode/beam.py's BeamGroup.step takes)
  streams       results right on a non-default stream whose inputs are written late
  graphs        captured in a CUDA graph and replayed on new logits, tokens and table contents
  model         generate() with ENCDEC_CUDA=1 gives transformers' tokens, with the selection kernels launched

`compute-sanitizer --tool memcheck python -m pytest tests/test_csrc_kernels.py -k awkward` runs each kernel once
on awkward shapes under memcheck.
"""

import dataclasses
import functools

import pytest
import torch
from csrc_checks import KINDS, library_or_skip, row_configs, scores, selection_case

from encdec_fast import csrc, csrc_ops
from encdec_fast.decode import ops as dops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the csrc kernels run on a GPU; owed there")
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def lib():
    got = library_or_skip()
    csrc.check_device(got)
    return got


def _no_fallback(*a, **k):
    raise AssertionError("the csrc op fell back to the torch op")


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------
def _case(kind, rows, vocab, length=11, seed=0, lengths=True):
    """selection_case on the GPU; rows of lengths 1 .. length + 5 (every slot of the buffer) when `lengths`."""
    lens = [1 + (7 * r + seed) % (length + 5) for r in range(rows)] if lengths else None
    return selection_case(kind, rows, vocab, length, lens=lens, seed=seed, device=DEV)


DTYPE_IDS = dict(argvalues=[torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])


@pytest.mark.parametrize("dtype", **DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,vocab", [(5, 97), (64, 50257), (512, 30522)])
def test_greedy_matches_processors_and_argmax(rows, vocab, kind, dtype):
    case = _case(kind, rows, vocab)
    s = scores(rows, vocab, dtype=dtype).to(DEV)
    got = csrc_ops.select_greedy(s, *case, fallback=_no_fallback)
    assert torch.equal(got, dops.select_greedy(s, *case)), kind


def test_greedy_ties_nan_inf_and_misaligned_rows():
    V = 101
    base = torch.randint(0, 3, (6, V + 1), generator=torch.Generator().manual_seed(0)).float()  # many ties
    base[3, 40], base[3, 7] = float("nan"), float("nan")  # NaN wins, first NaN
    base[4] = float("-inf")  # all -inf: index 0
    base[5, :] = -1.0
    s = base.to(DEV)[:, 1:]  # rows start 4 bytes past a 16-byte boundary, row stride 102
    for kind in ("none", "all", "mixed"):
        case = _case(kind, 6, V, 5)
        assert torch.equal(csrc_ops.select_greedy(s, *case, fallback=_no_fallback), dops.select_greedy(s, *case)), kind


def test_greedy_reads_only_the_rows_it_chooses_for():
    """logits of n rows and tables / buffers of more (an eager extent): row r reads row r of each table."""
    seq, t, tables, spec = _case("mixed", 9, 61)
    s = scores(5, 61, seed=6).to(DEV)
    got = csrc_ops.select_greedy(s, seq, t, tables, spec, fallback=_no_fallback)
    assert got.shape == (5,) and torch.equal(got, dops.select_greedy(s, seq, t, tables, spec))


@pytest.mark.parametrize("dtype", **DTYPE_IDS)
@pytest.mark.parametrize("kind", ["none", "all", "ngram2", "mixed"])
@pytest.mark.parametrize("requests,beams,vocab", [(1, 2, 97), (3, 4, 50257), (16, 8, 30522), (2, 32, 500)])
def test_beam_candidates_match_one_beam_search_step(requests, beams, vocab, kind, dtype):
    N = requests * beams
    case = _case(kind, N + 3, vocab, 9, seed=2)  # 3 rows past the beams: not read
    logits = scores(N + 3, vocab, seed=3, dtype=dtype).to(DEV)
    running = torch.randn(requests, beams, generator=torch.Generator().manual_seed(4)).to(DEV)
    running[0, 1:] = -1e9  # the first step's beam scores
    for k in sorted({min(2 * beams, 32), min(3 * beams, 32)}):  # 2 x beams; 3 x beams (two eos ids)
        top, idx = csrc_ops.select_beam(logits, *case, running, k, fallback=_no_fallback)
        want_top, want_idx = dops.select_beam(logits, *case, running, k)
        assert torch.equal(idx, want_idx), f"k={k}: {idx.tolist()} vs {want_idx.tolist()}"
        torch.testing.assert_close(top, want_top, atol=2e-5, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# streams, graphs, memcheck
# ------------------------------------------------------------------------------------------------
def _run_all(s, case, running):
    tok = csrc_ops.select_greedy(s, *case, fallback=_no_fallback)
    top, idx = csrc_ops.select_beam(s, *case, running, 4, fallback=_no_fallback)
    return tok, top, idx


def _refs(s, case, running):
    return (dops.select_greedy(s, *case), *dops.select_beam(s, *case, running, 4))


def _same(got, want):
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-6)


def _inputs(seed):
    s = scores(4, 50257, seed=seed).to(DEV)
    return s, _case("all", 4, 50257, 9, seed=seed), torch.zeros(2, 2, device=DEV)


def test_kernels_run_on_a_non_default_stream_after_its_writes():
    src = _inputs(1)
    dst = _inputs(1)
    s, (seq, t, tables, _), running = dst
    late = [s, seq, t, tables.seen, tables.ban, running]  # written on the side stream, late
    for d in late:
        d.zero_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the copies below land late: a kernel on another stream would miss them
        ss, (sseq, st, stables, _), srun = src
        for d, v in zip(late, [ss, sseq, st, stables.seen, stables.ban, srun]):
            d.copy_(v)
        got = _run_all(*dst)
    side.synchronize()
    _same(got, _refs(*src))


def test_kernels_capture_in_a_cuda_graph_and_replay_on_new_inputs():
    """As DecodeState's captured step uses them: the launch reads the tables in place, so a replay after new
    logits, tokens, lengths and a new request's settings in some rows (RowTables.assign, no reallocation)
    chooses for the new contents."""
    s, case, running = static = _inputs(3)
    seq, t, tables, _ = case
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture (lazy module loading)
        _run_all(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run_all(*static)
    fs, (fseq, ft, _, _), frun = _inputs(4)
    for st_, new in zip((s, seq, t, running), (fs, fseq, ft, frun)):
        st_.copy_(new)
    version = tables.version
    cfg = dataclasses.replace(row_configs("none", 1, 50257, 9)[0], penalty=2.5, ngram=3, min_len=20)
    for r in (1, 2):  # another request's settings, over the new tokens
        tables.assign(torch.tensor([r], device=DEV), cfg, seq[r:r + 1, :int(t[r])])
    assert tables.version == version  # contents changed in place: the captured launch reads them
    graph.replay()
    torch.cuda.synchronize()
    _same(out, _refs(s, case, running))


def test_every_kernel_once_on_awkward_shapes():
    """The memcheck target: an odd vocabulary, misaligned rows, every dtype, every processor."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = scores(6, 98, dtype=dtype).to(DEV)[:, 1:]
        for kind in ("all", "mixed"):
            case = _case(kind, 6, 97, 7)
            assert torch.equal(csrc_ops.select_greedy(s, *case, fallback=_no_fallback), dops.select_greedy(s, *case))
            running = torch.zeros(2, 3, device=DEV)
            got = csrc_ops.select_beam(s, *case, running, 9, fallback=_no_fallback)
            assert torch.equal(got[1], dops.select_beam(s, *case, running, 9)[1])
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("kw", [dict(), dict(num_beams=4), dict(no_repeat_ngram_size=2, repetition_penalty=1.3,
                                                                 min_new_tokens=4, bad_words_ids=[[5], [7, 8]]),
                                dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3,
                                     bad_words_ids=[[5], [7, 8]])])
def test_generate_with_encdec_cuda_1_gives_transformers_tokens(make_ckpt, monkeypatch, kw):
    from conftest import hf_model
    from test_parity import make_inputs

    import encdec_fast

    path = make_ckpt("bert", "gpt2", enc_hidden=64)
    monkeypatch.setenv("ENCDEC_CUDA", "1")
    ours = encdec_fast.load(path, device="cuda", dtype=torch.float32)
    choose = ours.dops.select_greedy
    assert isinstance(choose, functools.partial) and choose.func is csrc_ops.select_greedy
    launched = []
    call = csrc_ops._call
    monkeypatch.setattr(csrc_ops, "_call", lambda name, *a: launched.append(name) or call(name, *a))
    ref = hf_model(path)
    ids, mask, _ = make_inputs(3, 11, 1, 97, 0, padded=True, avoid=(0, ref.config.pad_token_id))
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, **kw)
    got = ours.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=10, **kw)
    assert torch.equal(got.cpu(), want), f"\nours {got.tolist()}\ntransformers {want.tolist()}"
    assert ("encdec_select_beam" if kw.get("num_beams") else "encdec_select_greedy") in launched, set(launched)
