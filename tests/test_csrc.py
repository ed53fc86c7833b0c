"""csrc/ on the CPU: the build, the exported C ABI, the loader's cache and errors, ENCDEC_CUDA, the op-table
wiring, and the torch semantics the kernels implement. The kernels themselves run in
test_csrc_kernels.py, on a GPU.

CI sets ENCDEC_CSRC_REQUIRE_BUILD=1 (.ci/run): there a missing nvcc or a broken build fails here.
"""

import ctypes
import logging
import re
import shutil
import subprocess

import pytest
import torch
from csrc_checks import KINDS, library_or_skip, nvcc_or_skip, scores, selection_case

from encdec_fast import csrc, csrc_ops
from encdec_fast.decode import ops as dops
from encdec_fast.decode import select as sel
from encdec_fast.errors import CudaKernelError, UnsupportedArgumentError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU driver")


@pytest.fixture(scope="module")
def lib():
    return library_or_skip()


@pytest.fixture
def unset(monkeypatch):
    """ENCDEC_CUDA unset, no remembered log lines (the library built for the session stays loaded)."""
    monkeypatch.delenv("ENCDEC_CUDA", raising=False)
    monkeypatch.delenv("ENCDEC_CUDA_LIB", raising=False)
    monkeypatch.setattr(csrc, "_SAID", set())


@pytest.fixture
def fresh(unset, monkeypatch, tmp_path):
    """As unset, with a private cache and no library loaded."""
    monkeypatch.setenv("ENCDEC_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(csrc, "_LOADED", {})
    return tmp_path


# ------------------------------------------------------------------------------------------------
# the library: symbols, ABI, errors without a driver
# ------------------------------------------------------------------------------------------------
def test_library_exports_exactly_the_c_abi(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib.path)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == set(csrc.SIGNATURES), f"exported {sorted(exported)}"


def test_abi_version_matches_the_header(lib):
    header = (csrc.source_dir() / "encdec_abi.h").read_text()
    assert int(re.search(r"#define ENCDEC_ABI_VERSION (\d+)", header).group(1)) == csrc.ABI_VERSION
    assert lib.lib.encdec_abi_version() == csrc.ABI_VERSION
    assert lib.lib.encdec_select_params_size() == ctypes.sizeof(csrc.SelectParams)


def test_params_struct_layout_matches_ctypes(tmp_path):
    """Every field of encdec_select_params at the offset ctypes gives it (compiled by the host compiler)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the layout probe")
    names = [f[0] for f in csrc.SelectParams._fields_]
    prints = "".join(f'printf("%s %zu\\n", "{n}", offsetof(encdec_select_params, {n}));' for n in names)
    probe = tmp_path / "layout.cc"
    probe.write_text(f'#include <cstddef>\n#include <cstdio>\n#include "encdec_abi.h"\nint main(){{{prints}}}\n')
    subprocess.run(["g++", "-I", str(csrc.source_dir()), str(probe), "-o", str(tmp_path / "layout")], check=True)
    got = dict(line.split() for line in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                                                        check=True).stdout.splitlines())
    assert {n: int(v) for n, v in got.items()} == {n: getattr(csrc.SelectParams, n).offset for n in names}


@no_gpu
def test_first_cuda_call_without_a_driver_returns_35(lib):
    rc, count = lib.device_count()
    assert (rc, count) == (35, 0)
    assert "driver" in lib.error_string(rc).lower()


@no_gpu
def test_launchers_return_the_error_and_the_process_goes_on(lib):
    """Without a driver a launch returns 35 and _call raises it with its message; arguments the kernels do not
    take are refused with 1 (cudaErrorInvalidValue) before any CUDA call; torch runs on afterwards."""
    seq, t, tables, spec = selection_case("all", 6, 50, 4)
    p = csrc_ops.select_params(seq, t, tables, spec)
    s, out = torch.zeros(6, 50), torch.empty(6, dtype=torch.long)
    greedy = [s.data_ptr(), 50, 6, 50, 0, p, out.data_ptr(), None]
    assert lib.lib.encdec_select_greedy(*greedy) == 35
    with pytest.raises(CudaKernelError, match=r"encdec_select_greedy failed with CUDA error 35 \(CUDA driver version"):
        csrc_ops._call("encdec_select_greedy", *greedy)
    too_big = list(greedy)
    too_big[3] = csrc_ops.MAX_VOCAB + 1
    assert lib.lib.encdec_select_greedy(*too_big) == 1 and "invalid argument" in lib.error_string(1)
    running, k = torch.zeros(2, 3), 4
    cand_scores, cand_index = torch.empty(6, k), torch.empty(6, k, dtype=torch.int32)
    top, index = torch.empty(2, k), torch.empty(2, k, dtype=torch.long)
    beam = [s.data_ptr(), 50, 2, 3, 50, 0, p, running.data_ptr(), k, cand_scores.data_ptr(), cand_index.data_ptr(),
            top.data_ptr(), index.data_ptr(), None]
    assert lib.lib.encdec_select_beam(*beam) == 35
    with pytest.raises(CudaKernelError, match=r"encdec_select_beam failed with CUDA error 35 \(CUDA driver version"):
        csrc_ops._call("encdec_select_beam", *beam)
    too_many = list(beam)
    too_many[2:4] = [1, csrc_ops.MAX_BEAMS + 1]  # more beams than the kernels take
    assert lib.lib.encdec_select_beam(*too_many) == 1
    assert torch.zeros(2).add(1).sum().item() == 2  # torch still fine


# ------------------------------------------------------------------------------------------------
# the loader: cache, build errors, ABI checks
# ------------------------------------------------------------------------------------------------
def _sources(tmp_path, files: dict) -> object:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(csrc.source_dir() / "encdec_abi.h", src)
    for name, text in files.items():
        (src / name).write_text(text)
    return src


def test_build_key_follows_sources_and_flags(fresh, monkeypatch):
    nvcc = nvcc_or_skip()
    src = _sources(fresh, {"a.cu": "int a;\n"})
    key = csrc.build_key(src, nvcc)
    assert csrc.build_key(src, nvcc) == key
    (src / "a.cu").write_text("int a; \n")
    assert csrc.build_key(src, nvcc) != key
    key2 = csrc.build_key(src, nvcc)
    monkeypatch.setattr(csrc, "COMPILE_FLAGS", csrc.COMPILE_FLAGS + ("-DX",))
    assert csrc.build_key(src, nvcc) != key2


def test_build_goes_to_the_cache_once_and_checks_the_symbols(fresh):
    """A library built from abi.cu alone lands in <cache>/<key>/ (nothing else left there), is reused, and is
    refused because it lacks the kernels' symbols."""
    nvcc_or_skip()
    src = _sources(fresh, {"abi.cu": (csrc.source_dir() / "abi.cu").read_text()})
    with pytest.raises(CudaKernelError, match="does not export encdec_select_greedy"):
        csrc.library(src)
    built = list((fresh / "cache").rglob("*"))
    lib_path = fresh / "cache" / csrc.build_key(src, csrc.find_nvcc()) / csrc.LIB_NAME
    assert lib_path.is_file() and sorted(built) == sorted([lib_path.parent, lib_path]), built
    mtime = lib_path.stat().st_mtime_ns
    assert csrc._locate(src) == lib_path and lib_path.stat().st_mtime_ns == mtime  # no rebuild


def test_compiler_error_is_raised_verbatim_with_encdec_cuda_1(fresh, monkeypatch):
    nvcc_or_skip()
    src = _sources(fresh, {"broken.cu": "int f() { return undefined_name_xyz; }\n"})
    monkeypatch.setattr(csrc, "source_dir", lambda: src)
    monkeypatch.setenv("ENCDEC_CUDA", "1")
    with pytest.raises(CudaKernelError) as e:
        csrc.enabled_ops(frozenset())
    msg = str(e.value)
    assert "ENCDEC_CUDA=1" in msg and "nvcc could not compile" in msg
    assert re.search(r"broken\.cu\(1\): error: identifier \"undefined_name_xyz\" is undefined", msg), msg
    assert not list((fresh / "cache").rglob("*.so"))


def test_broken_build_under_auto_logs_one_line_and_keeps_triton(fresh, monkeypatch, caplog):
    nvcc_or_skip()
    src = _sources(fresh, {"broken.cu": "int f() { return undefined_name_xyz; }\n"})
    monkeypatch.setattr(csrc, "source_dir", lambda: src)
    with caplog.at_level(logging.INFO, logger="encdec_fast.csrc"):
        assert csrc.enabled_ops(frozenset({"select_greedy"})) == ()
        assert csrc.enabled_ops(frozenset({"select_greedy"})) == ()
    lines = [r for r in caplog.records if "csrc) off" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "undefined_name_xyz" in lines[0].getMessage()


def _fake_library(tmp_path, version: int, params_size: str) -> str:
    """A shared object with the ABI's symbols whose version / params size are wrong: what an old prebuilt
    library looks like to the loader."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    body = f"""#include "encdec_abi.h"
ENCDEC_EXPORT int encdec_abi_version(void) {{ return {version}; }}
ENCDEC_EXPORT size_t encdec_select_params_size(void) {{ return {params_size}; }}
ENCDEC_EXPORT const char* encdec_error_string(int) {{ return "x"; }}
ENCDEC_EXPORT int encdec_probe(int* n) {{ *n = 0; return 35; }}
ENCDEC_EXPORT int encdec_select_greedy(const void*, int64_t, int, int, int, const encdec_select_params*, int64_t*,
                                       void*) {{ return 35; }}
ENCDEC_EXPORT int encdec_select_beam(const void*, int64_t, int, int, int, int, const encdec_select_params*,
                                     const float*, int, float*, int32_t*, float*, int64_t*, void*) {{ return 35; }}
"""
    c = tmp_path / f"fake{version}.cc"
    c.write_text(body)
    so = tmp_path / f"libfake{version}.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-fvisibility=hidden", "-I", str(csrc.source_dir()), str(c), "-o",
                    str(so)], check=True)
    return str(so)


def test_prebuilt_library_with_another_abi_is_refused(fresh, monkeypatch):
    monkeypatch.setenv("ENCDEC_CUDA_LIB", _fake_library(fresh, 99, "sizeof(encdec_select_params)"))
    with pytest.raises(CudaKernelError, match=f"has ABI version 99, this encdec_fast needs {csrc.ABI_VERSION}"):
        csrc.library()
    monkeypatch.setattr(csrc, "_LOADED", {})
    monkeypatch.setenv("ENCDEC_CUDA_LIB", _fake_library(fresh, csrc.ABI_VERSION, "8"))
    with pytest.raises(CudaKernelError, match="encdec_select_params is 8 bytes"):
        csrc.library()


# ------------------------------------------------------------------------------------------------
# ENCDEC_CUDA and the op table
# ------------------------------------------------------------------------------------------------
def test_auto_with_nothing_measured_builds_nothing_and_says_why(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="encdec_fast.csrc"):
        t = dops.table("triton")
        dops.table("triton")
    assert all(getattr(getattr(t, n), "func", None) is not getattr(csrc_ops, n) for n in csrc.OPS)
    lines = [r.getMessage() for r in caplog.records if "csrc) off" in r.getMessage()]
    assert len(lines) == 1 and "ENCDEC_CUDA=1 forces them on" in lines[0]
    assert not (fresh / "cache").exists()


def test_encdec_cuda_0_and_bad_values(fresh, monkeypatch):
    monkeypatch.setenv("ENCDEC_CUDA", "0")
    assert csrc.enabled_ops(frozenset(csrc.OPS)) == ()
    monkeypatch.setenv("ENCDEC_CUDA", "yes")
    with pytest.raises(UnsupportedArgumentError, match="ENCDEC_CUDA='yes'"):
        dops.table("triton")


@no_gpu
def test_encdec_cuda_1_without_a_gpu_is_a_clear_error(lib, unset, monkeypatch):
    monkeypatch.setenv("ENCDEC_CUDA", "1")
    with pytest.raises(CudaKernelError, match=r"ENCDEC_CUDA=1 .* failed with error 35 \(CUDA driver version is "
                                              r"insufficient.*Set ENCDEC_CUDA=auto or 0"):
        dops.table("triton")


@no_gpu
def test_auto_with_measured_ops_but_no_gpu_warns_once(lib, unset, monkeypatch, caplog):
    monkeypatch.setattr(dops, "CSRC_FASTER", frozenset({"select_greedy"}))
    with caplog.at_level(logging.INFO, logger="encdec_fast.csrc"):
        t = dops.table("triton")
    assert t.select_greedy is dops.select_greedy
    [line] = [r for r in caplog.records if "csrc) off" in r.getMessage()]
    assert line.levelno == logging.WARNING and "error 35" in line.getMessage()


def test_csrc_ops_replace_exactly_the_enabled_entries_and_fall_back_off_gpu(fresh, monkeypatch):
    """With the device check passed (as on a GPU), the table takes csrc's versions of the measured ops only;
    on CPU tensors each falls back to the op it replaced, with the same result."""
    monkeypatch.setattr(csrc, "check_device", lambda lib: None)
    monkeypatch.setattr(csrc, "library", lambda src=None: None)
    monkeypatch.setattr(dops, "CSRC_FASTER", frozenset({"select_greedy"}))
    t = dops.table("triton")
    assert t.select_greedy.func is csrc_ops.select_greedy and t.select_greedy.keywords["fallback"] is dops.select_greedy
    assert t.select_beam is dops.select_beam  # not measured: unchanged
    monkeypatch.setenv("ENCDEC_CUDA", "0")
    plain = dops.table("triton")
    monkeypatch.setenv("ENCDEC_CUDA", "1")
    forced = dops.table("triton")
    assert all(getattr(forced, n).func is getattr(csrc_ops, n) for n in csrc.OPS)
    case, s, running = selection_case("mixed", 7, 40, 9), scores(7, 40), torch.randn(3, 2)
    assert torch.equal(forced.select_greedy(s, *case), plain.select_greedy(s, *case))
    got, want = forced.select_beam(s, *case, running, 4), plain.select_beam(s, *case, running, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("kw", [dict(no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4,
                                     bad_words_ids=[[5], [7, 8]]),
                                dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3)])
def test_decode_step_chooses_through_the_csrc_entries_of_the_op_table(make_ckpt, monkeypatch, kw):
    """DecodeState.commit (greedy) and BeamGroup.step take their tokens from the decode op table's select_greedy /
    select_beam: with the csrc entries in the table (falling back to the torch ops on CPU tensors, as they
    do for whatever they do not cover) generate() still gives transformers' tokens; every step calls the op
    with the raw logits, and the processors run once per step, inside it (the decoder step does not
    process the scores when only the selection reads them)."""
    import dataclasses
    from collections import Counter

    from conftest import hf_model
    from test_parity import make_inputs

    import encdec_fast

    path = make_ckpt("bert", "gpt2")
    ours, ref = encdec_fast.load(path, device="cpu"), hf_model(path)
    calls = Counter()

    def entry(name):
        def op(logits, *args):
            calls[name] += 1
            assert logits.dtype == ours.dtype and (logits > 0).any()  # raw logits, not log-probs
            return getattr(csrc_ops, name)(logits, *args, fallback=getattr(dops, name))
        return op

    process = sel.process
    monkeypatch.setattr(sel, "process", lambda *a: calls.update(["process"]) or process(*a))
    table = dataclasses.replace(dops.table("torch"), select_greedy=entry("select_greedy"), select_beam=entry("select_beam"))
    monkeypatch.setattr(dops, "table", lambda backend, device=None: table)
    ids, mask, _ = make_inputs(3, 9, 1, 97, 0, padded=True, avoid=(0, ref.config.pad_token_id))
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
    assert torch.equal(got, want), f"\nours {got.tolist()}\ntransformers {want.tolist()}"
    name = "select_beam" if kw.get("num_beams") else "select_greedy"
    assert calls[name] >= 1 and calls["process"] == calls[name], calls
    assert name == "select_greedy" or not calls["select_greedy"]  # beam rows only: no greedy choice to make


# ------------------------------------------------------------------------------------------------
# the torch semantics: what the selection kernels compute
# ------------------------------------------------------------------------------------------------
def _read(addr: int, ctype, count: int) -> list:
    return list((ctype * count).from_address(addr)) if count else []


def kernel_rule(s: torch.Tensor, p: csrc.SelectParams) -> torch.Tensor:
    """csrc/select.cu's build_masks + process in Python, reading the rows' tokens and tables only through the
    encdec_select_params that select_params hands the kernels (CPU tensors: its pointers are host addresses):
    per row, a seen and a banned mask, then banned -> -inf, seen -> penalised."""
    i64, f32, u8 = ctypes.c_int64, ctypes.c_float, ctypes.c_uint8
    N, V = s.shape
    out = s.float().clone()
    for r in range(N):
        [n_tok] = _read(p.lens + 8 * r * p.lens_stride, i64, 1)
        ids = _read(p.ids + 8 * r * p.ids_stride, i64, n_tok)
        penalty = _read(p.penalty + 4 * r * p.penalty_stride, f32, 1)[0] if p.penalty else 1.0
        seen = torch.zeros(V, dtype=torch.bool)
        if penalty != 1.0:
            seen = torch.tensor(_read(p.seen + r * p.seen_stride, u8, V), dtype=torch.bool)
        banned = torch.zeros(V, dtype=torch.bool)
        if p.ban:
            banned = torch.tensor(_read(p.ban + r * p.ban_stride, u8, V), dtype=torch.bool)
        n = _read(p.ngram + 8 * r * p.ngram_stride, i64, 1)[0] if p.ngram and p.ngram_sizes else 0
        if 0 < n < 64 and p.ngram_sizes >> n & 1 and n_tok >= n:
            for i in range(n_tok - n + 1):
                if ids[i:i + n - 1] == ids[n_tok - n + 1:]:
                    banned[ids[i + n - 1]] = True
        plen, last = _read(p.bad_plen or 0, i64, p.n_bad), _read(p.bad_last or 0, i64, p.n_bad)
        for g in range(p.n_bad):
            owned = _read(p.bad_owner + r * p.bad_owner_stride + g, u8, 1)[0]
            if owned and plen[g] <= n_tok and ids[n_tok - plen[g]:] == _read(p.bad_prefix + 8 * g * p.bad_prefix_stride,
                                                                              i64, plen[g]):
                banned[last[g]] = True
        if p.min_len and n_tok < _read(p.min_len + 8 * r * p.min_len_stride, i64, 1)[0]:
            for e in _read(p.eos + 8 * r * p.eos_stride, i64, p.n_eos):
                if 0 <= e < V:
                    banned[e] = True
        row, pen = out[r], torch.full((V,), penalty)
        row.copy_(torch.where(seen, torch.where(row < 0, row * pen, row / pen), row).masked_fill(banned, float("-inf")))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_rule_over_the_params_gives_process(kind):
    """What the selection kernels compute from the params (its pointers, strides, the spec's NULLs and n-gram
    bits) equals decode/select.py's process, element for element, on rows of different lengths and settings."""
    V, N = 50, 7
    lens = [9, 1, 4, 9, 3, 12, 2] if kind in ("all", "mixed") else None
    seq, t, tables, spec = selection_case(kind, N, V, 9, lens=lens)
    s = scores(N, V)
    want = sel.process(s, seq, t, tables, spec)
    assert torch.equal(kernel_rule(s, csrc_ops.select_params(seq, t, tables, spec)), want)
    assert (want == float("-inf")).any() or kind in ("none", "repetition")  # the bans fire
    assert torch.equal(dops.select_greedy(s, seq, t, tables, spec), want.argmax(-1))


def test_params_point_into_the_tables_and_leave_off_what_spec_leaves_off():
    seq, t, tables, spec = selection_case("mixed", 6, 40, 9)
    p = csrc_ops.select_params(seq, t, tables, spec)
    assert (p.ids, p.ids_stride, p.lens, p.lens_stride) == (seq.data_ptr(), seq.shape[1], t.data_ptr(), 1)
    assert (p.penalty, p.seen, p.seen_stride) == (tables.penalty.data_ptr(), tables.seen.data_ptr(), 40)
    assert (p.ngram, p.ngram_sizes) == (tables.ngram.data_ptr(), 0b1110)  # sizes 1, 2, 3
    assert (p.eos, p.eos_stride, p.n_eos) == (tables.eos.data_ptr(), 3, 3)
    assert p.n_bad == p.bad_owner_stride == tables.bad_owner.shape[1] > 0
    assert (p.bad_prefix, p.bad_prefix_stride) == (tables.bad_prefix.data_ptr(), tables.bad_prefix.shape[1])
    none = csrc_ops.select_params(*selection_case("none", 6, 40, 9)[:3], sel.Spec())
    assert not any((none.penalty, none.seen, none.ngram, none.ngram_sizes, none.ban, none.min_len, none.n_bad))


def test_sampling_specs_and_long_ngrams_are_not_fused():
    seq, t, tables, _ = selection_case("all", 3, 40, 9)
    for spec in (sel.Spec(temperature=True, sample=True), sel.Spec(top_k=True, sample=True),
                 sel.Spec(top_p=True, sample=True), sel.Spec(ngram_sizes=(64,))):
        assert csrc_ops.select_params(seq, t, tables, spec) is None, spec
    assert csrc_ops.select_params(seq, t, tables, sel.Spec(sample=True)) is not None  # sample alone: no warper
