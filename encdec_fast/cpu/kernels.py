"""The CPU projection kernels of csrc/cpu_linear.cpp: built by the C++ compiler on first use, loaded with ctypes.

Two products with fp32 activations, fp32 sums and fp32 outputs, over weights packed once at load
(weights.py): int8 weights with fp16 scales per output channel and group of 32 inputs (each activation row
quantised to int16 inside the call: AVX512-VNNI), and bf16 weights (activations rounded to bf16: AVX512-BF16); and a decode attention
over fp32 or bf16 keys (one call per layer for every row's window). See the C++ file for the arithmetic, the
layout and why torch's own kernels do not do this.

  build   g++ (or $CXX) -O3 -march=native -fopenmp: the library is built on the machine that runs it, for
          its CPU. OpenMP resolves to the libgomp.so.1 torch has already loaded, so torch.set_num_threads
          sets this library's threads too.
  cache   <ENCDEC_CPU_CACHE or ~/.cache/encdec_fast/cpu>/<key>/libencdec_cpu.so, key = a hash of the
          source, the flags, the compiler's version and this CPU's flags. Built in a temporary folder and
          renamed into place, so concurrent processes never load a half-written file.
  needs   x86-64 with AVX-512 (F, BW, VL; VNNI and BF16 used where present), a C++ compiler. Where any is
          missing, available() says why and quantize.py runs its torch reference ops instead (same numbers
          up to the int16 rounding of the activations, much slower); ENCDEC_CPU_KERNELS=0 forces that.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

ABI_VERSION = 12  # csrc/cpu_linear.cpp ENCDEC_CPU_ABI_VERSION
LIB_NAME = "libencdec_cpu.so"
SOURCE_NAME = "cpu_linear.cpp"  # in csrc/
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fvisibility=hidden", "-std=c++17")
BLOCK = 32  # outputs per packed block (N is padded to a multiple of it)
VNNI, BF16 = 1, 2  # encdec_cpu_features bits

log = logging.getLogger("encdec_fast.cpu")

_p, _i32, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
SIGNATURES = {
    "encdec_cpu_abi_version": (_i32, []),
    "encdec_cpu_features": (_i32, []),
    "encdec_cpu_error_string": (ctypes.c_char_p, [_i32]),
    "encdec_cpu_packed_rows": (_i64, [_i64]),
    "encdec_cpu_linear_i8": (_i32, [_p, _i64, _i64, _i64, _p, _p, _i64, _i64, _p, _p, _i64, _p, _i64, _p, _p,
                                    ctypes.c_float, _i32]),
    "encdec_cpu_linear_bf16": (_i32, [_p, _i64, _i64, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _p, _p, ctypes.c_float,
                                      _i32]),
    "encdec_cpu_linear_f32": (_i32, [_p, _i64, _i64, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _p, _p, ctypes.c_float,
                                     _i32]),
    "encdec_cpu_row_topk": (_i32, [_p, _i64, _i64, _i64, _i64, _p, _p]),
    "encdec_cpu_row_argmax": (_i32, [_p, _i64, _i64, _i64, _p, _p]),
    "encdec_cpu_move_rows": (_i32, [_p, _i64, _i64, _i64, _i64, _p, _p, _i64]),
    "encdec_cpu_decode_attention": (_i32, [_p, _i64, _i64, _p, _p, _i64, _i64, _i32, _p, _p, _i64, _i64, _i64,
                                           ctypes.c_float, _p, _i64, _i64, _p, _p, _i64, _i64, _p, _i64]),
    "encdec_cpu_decoder_step": (_i32, [_p, _i64, _p, _p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64, _i32, _i64, _i32, _p,
                                       _p, _p, _p, _p]),
    "encdec_cpu_commit_tokens": (_i32, [_p, _p, _i64, _i64, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _p, _p]),
}

_lock = threading.Lock()
_lib = None  # the loaded library, or the reason (str) it is not available
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl")


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cache_dir() -> Path:
    return Path(os.environ.get("ENCDEC_CPU_CACHE") or Path.home() / ".cache" / "encdec_fast" / "cpu")


def source() -> Path | None:
    """csrc/cpu_linear.cpp of a checkout or editable install, else the copy installed as package data."""
    repo = Path(__file__).resolve().parent.parent.parent / "csrc" / SOURCE_NAME
    if repo.is_file():
        return repo
    import importlib.util

    spec = importlib.util.find_spec("encdec_fast._csrc")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / SOURCE_NAME).is_file():
            return Path(loc) / SOURCE_NAME
    return None


def _build(cxx: str, src: Path) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = sorted(_cpu_flags())
    key = hashlib.sha256("\n".join([src.read_text(), " ".join(FLAGS), version, " ".join(flags),
                                     str(ABI_VERSION)]).encode()).hexdigest()[:16]
    target = _cache_dir() / key / LIB_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / LIB_NAME
        r = subprocess.run([cxx, *FLAGS, "-o", str(out), str(src)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {src.name}:\n{r.stderr.strip()}")
        os.replace(out, target)
    return target


def _load():
    if os.environ.get("ENCDEC_CPU_KERNELS", "1") == "0":
        return "ENCDEC_CPU_KERNELS=0"
    src = source()
    if src is None:
        return f"the kernel source {SOURCE_NAME} is not installed with encdec_fast"
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler (g++) found; install one or set CXX"
    try:
        path = _build(cxx, src)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"the kernels could not be built or loaded: {e}"
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.encdec_cpu_abi_version() != ABI_VERSION:
        return f"{path} has ABI version {lib.encdec_cpu_abi_version()}, this module {ABI_VERSION}"
    return lib


_I8 = _BF16 = _F32 = None  # the loaded products (ctypes functions), set by library()


def library():
    """The loaded library, or None (reason() says why)."""
    global _lib, _I8, _BF16, _F32
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _load()
                if not isinstance(_lib, str):
                    _I8, _BF16, _F32 = _lib.encdec_cpu_linear_i8, _lib.encdec_cpu_linear_bf16, _lib.encdec_cpu_linear_f32
                if isinstance(_lib, str):
                    log.warning("encdec_fast's CPU int8/bf16 kernels are not available (%s); the torch reference "
                                "ops run instead (same numbers, slower).", _lib)
    return None if isinstance(_lib, str) else _lib


def reason() -> str | None:
    """Why the kernels are not available (None when they are)."""
    library()
    return _lib if isinstance(_lib, str) else None


def features() -> int:
    lib = library()
    return lib.encdec_cpu_features() if lib is not None else 0


def has_int8() -> bool:
    return library() is not None


def has_bf16() -> bool:
    return bool(features() & BF16)


def _check(code: int, what: str):
    if code != 0:
        raise RuntimeError(f"encdec_cpu {what}: {library().encdec_cpu_error_string(code).decode()}")


def packed_rows(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _group(dtype: torch.dtype) -> int:
    """k values a lane holds together: 2 (int8, bf16: the pairs vpdpwssd / vdpbf16ps multiply), 1 (fp32)."""
    return 1 if dtype == torch.float32 else 2


def packed_empty(N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty packed weight for [N, K] (flat: packed_rows(N) x K rounded up to the group); fill it with pack_rows."""
    g = _group(dtype)
    return torch.empty(packed_rows(N) * (-(-K // g) * g), dtype=dtype)


def pack_rows(out: torch.Tensor, N: int, K: int, first: int, rows: torch.Tensor) -> None:
    """Write rows [first, first + len(rows)) of an [N, K] weight into the packed `out` ([N / 16][K / g][16][g], g =
    _group(dtype)); first is a multiple of 16, and the last call writes the padding (rows past N, a column past K)."""
    R = rows.shape[0]
    g = _group(rows.dtype)
    groups = -(-K // g)
    end = packed_rows(N) if first + R >= N else first + R
    if end % 16:
        raise ValueError("pack_rows: pass whole blocks of 16 rows (but for the last call)")
    padded = torch.nn.functional.pad(rows, (0, g * groups - K, 0, end - first - R))  # (end - first, g * groups)
    blocks = out.view(packed_rows(N) // 16, groups, 16, g)[first // 16:end // 16]
    blocks.copy_(padded.view(-1, 16, groups, g).permute(0, 2, 1, 3))


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] int8, bf16 or fp32 -> the packed layout (flat)."""
    N, K = w.shape
    out = packed_empty(N, K, w.dtype)
    pack_rows(out, N, K, 0, w)
    return out


def pack_scales(out: torch.Tensor, N: int, first: int, rows: torch.Tensor) -> None:
    """Write the group scales of rows [first, first + len(rows)) (fp16 [R, groups]) into the packed `out`
    ([packed_rows(N) / 16][groups][16], the order the int8 product reads them); first is a multiple of 16, and the last
    call writes the padding (zeros past N)."""
    R, groups = rows.shape
    end = packed_rows(N) if first + R >= N else first + R
    if end % 16:
        raise ValueError("pack_scales: pass whole blocks of 16 rows (but for the last call)")
    padded = torch.nn.functional.pad(rows, (0, 0, 0, end - first - R))
    out.view(packed_rows(N) // 16, groups, 16)[first // 16:end // 16].copy_(padded.view(-1, 16, groups).transpose(1, 2))


def unpack_scales(packed: torch.Tensor, N: int, groups: int) -> torch.Tensor:
    """The [N, groups] scales of packed ones (the inverse of pack_scales)."""
    return packed.view(packed_rows(N) // 16, groups, 16).transpose(1, 2).reshape(packed_rows(N), groups)[:N]


def unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The [N, K] matrix of a packed one (the inverse of pack; torch ops, for the reference path and tests)."""
    g = _group(packed.dtype)
    groups = -(-K // g)
    w = packed.view(packed_rows(N) // 16, groups, 16, g).permute(0, 2, 1, 3).reshape(packed_rows(N), g * groups)
    return w[:N, :K]


ACT = {None: 0, "tanh": 1, "none": 2}  # fused_linear's gelu= -> the kernel's epilogue (erf form: "none")


def linear(x: torch.Tensor, packed: torch.Tensor, N: int, scale: torch.Tensor | None, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, ln=None, gelu: str | None = None, group: int = 32) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N] fp32: gelu?(LN?(x) @ w.T + bias) + residual, on a packed int8 (scale: fp16, packed by
    pack_scales, one per output and group of `group` inputs), bf16 or fp32 (scale None) weight. ln: (weight, bias, eps) of a LayerNorm over K, fp32, or None;
    gelu: None, "tanh" or "none" (the erf form); bias fp32 [N]; residual fp32 [..., N]."""
    if _I8 is None:
        library()
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    r_ptr = r_stride = 0
    if residual is not None:
        r2 = residual if residual.dim() == 2 else residual.reshape(M, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        r_ptr, r_stride = r2.data_ptr(), r2.stride(0)
    ln_w = ln_b = 0
    eps = 0.0
    if ln is not None:
        ln_w, eps = ln[0].data_ptr(), ln[2]
        ln_b = ln[1].data_ptr() if ln[1] is not None else 0
    b_ptr = bias.data_ptr() if bias is not None else 0
    if scale is not None:
        code = _I8(x2.data_ptr(), x2.stride(0), M, K, packed.data_ptr(), scale.data_ptr(), group, N, b_ptr, r_ptr, r_stride,
                   y.data_ptr(), N, ln_w, ln_b, eps, ACT[gelu])
    elif packed.dtype == torch.float32:
        code = _F32(x2.data_ptr(), x2.stride(0), M, K, packed.data_ptr(), N, b_ptr, r_ptr, r_stride, y.data_ptr(), N,
                    ln_w, ln_b, eps, ACT[gelu])
    else:
        code = _BF16(x2.data_ptr(), x2.stride(0), M, K, packed.data_ptr(), N, b_ptr, r_ptr, r_stride, y.data_ptr(), N,
                     ln_w, ln_b, eps, ACT[gelu])
    if code:
        _check(code, "linear")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
                     scale: float, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     slots: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, H, D] fp32, k/v [T, H, D] fp32 or bf16 (unit stride on D, the same strides), starts/lens int64 [N]
    (windows within the T key rows) -> out [N, H, D] fp32 (zeros for a row with lens 0). k_new, v_new [N, H, D] fp32
    (the same strides) and slots int64 [N]: first written at key row slots[n] of k and v (in their dtype)."""
    N, H, D = q.shape
    out = torch.empty(N, H, D, dtype=torch.float32)
    if q.stride(-1) != 1:
        q = q.contiguous()
    bf = k.dtype == torch.bfloat16
    kn = vn = sl = 0
    nn = nh = 0
    if k_new is not None:
        if k_new.stride(-1) != 1 or v_new.stride() != k_new.stride():
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
        kn, vn, sl = k_new.data_ptr(), v_new.data_ptr(), slots.data_ptr()
        nn, nh = k_new.stride(0), k_new.stride(1)
    _check(library().encdec_cpu_decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
                                                 k.stride(0), k.stride(1), int(bf), starts.data_ptr(), lens.data_ptr(),
                                                 N, H, D, scale, out.data_ptr(), H * D, D, kn, vn, nn, nh, sl,
                                                 k.shape[0]),
           "decode_attention")
    return out


def row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The k largest values of each row of x [rows, n] fp32 (unit column stride), descending, and their indices:
    each row's exact top k values (among equal values the lower index first). None when a row holds NaN (torch.topk
    ranks NaN first: use it)."""
    rows, n = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    vals = torch.empty(rows, k, dtype=torch.float32)
    idx = torch.empty(rows, k, dtype=torch.long)
    code = library().encdec_cpu_row_topk(x.data_ptr(), rows, n, x.stride(0), k, vals.data_ptr(), idx.data_ptr())
    if code < 0:
        _check(code, "row_topk")
    return None if code == 1 else (vals, idx)


def row_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] fp32 (unit column stride, n >= 1) -> (the first index of each row's largest value long [rows],
    rows holding NaN or an infinity bool [rows]; their index is any in range)."""
    rows, n = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    idx = torch.empty(rows, dtype=torch.long)
    bad = torch.empty(rows, dtype=torch.bool)
    _check(library().encdec_cpu_row_argmax(x.data_ptr(), rows, n, x.stride(0), idx.data_ptr(), bad.data_ptr()),
           "row_argmax")
    return idx, bad


def move_rows(buf: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, length: int | None = None) -> None:
    """buf [G, R, L, ...] contiguous: buf[:, dst[i], :length] = buf[:, src[i], :length] for every i at once (the
    values read before any is written; length None: all L). dst, src long [n] in range."""
    G, R, L = buf.shape[:3]
    if not buf.is_contiguous():
        raise ValueError("move_rows: buf must be contiguous")
    per = buf[0, 0, 0].numel() * buf.element_size()  # bytes a slot
    d, s = dst.long().contiguous(), src.long().contiguous()
    _check(library().encdec_cpu_move_rows(buf.data_ptr(), G, R, L * per, (L if length is None else length) * per,
                                          d.data_ptr(), s.data_ptr(), d.numel()), "move_rows")


def commit_tokens(tokens, seq, t, limit, alive, busy, is_beam, beam_done, stop_t, pad, eos, steps, all_stopped_at) -> bool:
    """decode/ops.py's commit_tokens in one call, in place (the same arguments); False (nothing done) where an argument
    is not what the kernel reads (dtype, a non-unit stride), for the caller to run the torch version."""
    N = t.shape[0]
    longs, bools = (tokens, t, limit, stop_t, pad, steps, all_stopped_at), (alive, busy, is_beam, beam_done)
    if (any(a.dtype != torch.int64 or not a.is_contiguous() for a in longs)
            or any(a.dtype != torch.bool or not a.is_contiguous() for a in bools)
            or seq.dtype != torch.int64 or seq.stride(-1) != 1 or eos.dtype != torch.int64 or not eos.is_contiguous()
            or any(a.shape[0] != N for a in (*longs[:5], *bools, seq, eos)) or steps.numel() != 1
            or all_stopped_at.numel() != 1 or seq.shape[1] < 1):
        return False
    _check(library().encdec_cpu_commit_tokens(tokens.data_ptr(), seq.data_ptr(), seq.stride(0), seq.shape[1],
                                              t.data_ptr(), limit.data_ptr(), alive.data_ptr(), busy.data_ptr(),
                                              is_beam.data_ptr(), beam_done.data_ptr(), stop_t.data_ptr(), pad.data_ptr(),
                                              eos.data_ptr(), eos.shape[1], N, steps.data_ptr(),
                                              all_stopped_at.data_ptr()), "commit_tokens")
    return True
