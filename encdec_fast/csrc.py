"""The CUDA C++ kernels of csrc/: built by nvcc on first use, loaded with ctypes, switched by ENCDEC_CUDA.

csrc/*.cu hold kernels behind a C ABI (csrc/encdec_abi.h: raw device pointers, sizes, the stream;
each launcher returns the cudaError_t): today token selection (select.cu: the deterministic logits
processors fused with greedy argmax, and with beam search's log-softmax + top k), which csrc_ops.py
binds to the op table's select_greedy / select_beam. torch's C++ extension builder cannot build CUDA
code against a CPU torch wheel, so the library is a standalone shared object:

  build   nvcc compiles each csrc/*.cu (in parallel) and links libencdec_cuda.so with the CUDA runtime
          linked statically, for sm_90 (plus compute_90 PTX for newer GPUs). It needs no libcuda to
          load: the driver is opened at the first CUDA call, which returns error 35 on a machine
          without one.
  cache   <ENCDEC_CUDA_CACHE or ~/.cache/encdec_fast/csrc>/<key>/libencdec_cuda.so, key = a hash of the
          sources, the flags, the nvcc version and the ABI version. Built in a temporary folder and
          renamed into place, so concurrent processes never load a half-written file.
  prebuilt ENCDEC_CUDA_LIB=path, or a libencdec_cuda.so shipped beside the sources, is loaded instead
          of building (same ABI checks).
  load    every exported symbol gets explicit ctypes argtypes/restype (SIGNATURES); the library's
          ABI version and the size of its params struct must equal this module's.

ENCDEC_CUDA picks (read each time an op table is made):
  auto (default)  use the csrc ops listed in decode/ops.py's CSRC_FASTER (the ones measured faster on a GPU) when
                  the library builds, loads and finds a GPU of compute capability >= 9.0; otherwise
                  log once why not, and the Triton table stays as it is.
  0               never.
  1               every csrc op, whatever was measured (how the GPU benchmarks measure them); any
                  failure (no nvcc, a compiler error, shown verbatim, no driver, no GPU) raises
                  CudaKernelError.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import CudaKernelError, UnsupportedArgumentError

ABI_VERSION = 3  # csrc/encdec_abi.h ENCDEC_ABI_VERSION
LIB_NAME = "libencdec_cuda.so"
MIN_CAPABILITY = (9, 0)  # sm_90 code, compute_90 PTX
COMPILE_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                 "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90")
LINK_FLAGS = ("-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL")
OPS = ("select_greedy", "select_beam")  # what csrc_ops provides

log = logging.getLogger("encdec_fast.csrc")

_p, _i32, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


class SelectParams(ctypes.Structure):
    """encdec_select_params (csrc/encdec_abi.h), field for field."""

    _fields_ = [
        ("ids", _p), ("ids_stride", _i64),
        ("lens", _p), ("lens_stride", _i64),
        ("penalty", _p), ("penalty_stride", _i64),
        ("seen", _p), ("seen_stride", _i64),
        ("ngram", _p), ("ngram_stride", _i64), ("ngram_sizes", ctypes.c_uint64),
        ("ban", _p), ("ban_stride", _i64),
        ("min_len", _p), ("min_len_stride", _i64),
        ("eos", _p), ("eos_stride", _i64), ("n_eos", ctypes.c_int32),
        ("n_bad", ctypes.c_int32), ("bad_prefix", _p), ("bad_prefix_stride", _i64),
        ("bad_plen", _p), ("bad_last", _p), ("bad_owner", _p), ("bad_owner_stride", _i64),
    ]


# every exported symbol: (restype, argtypes); the tests check this list against the library's exports
SIGNATURES = {
    "encdec_abi_version": (_i32, []),
    "encdec_select_params_size": (ctypes.c_size_t, []),
    "encdec_error_string": (ctypes.c_char_p, [_i32]),
    "encdec_probe": (_i32, [ctypes.POINTER(_i32)]),
    "encdec_select_greedy": (_i32, [_p, _i64, _i32, _i32, _i32, ctypes.POINTER(SelectParams), _p, _p]),
    "encdec_select_beam": (_i32, [_p, _i64, _i32, _i32, _i32, _i32, ctypes.POINTER(SelectParams), _p, _i32,
                                  _p, _p, _p, _p, _p]),
}


# ------------------------------------------------------------------------------------------------
# finding the sources, nvcc and the cache
# ------------------------------------------------------------------------------------------------
def source_dir() -> Path:
    """csrc/ of a checkout or editable install, else the copy installed as package data (encdec_fast._csrc)."""
    repo = Path(__file__).resolve().parent.parent / "csrc"
    if (repo / "encdec_abi.h").is_file():
        return repo
    import importlib.util

    spec = importlib.util.find_spec("encdec_fast._csrc")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "encdec_abi.h").is_file():
            return Path(loc)
    raise CudaKernelError("the csrc/ sources are not installed with encdec_fast (no encdec_abi.h beside the package); "
                          "reinstall encdec_fast, or set ENCDEC_CUDA=0.")


def sources(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in (".cu", ".h"))


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if os.access(default, os.X_OK) else None


def cache_root() -> Path:
    if os.environ.get("ENCDEC_CUDA_CACHE"):
        return Path(os.environ["ENCDEC_CUDA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "encdec_fast" / "csrc"


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise CudaKernelError(f"`{nvcc} --version` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout


def build_key(src: Path, nvcc: str) -> str:
    """A hash of everything the library depends on: sources, flags, compiler version, ABI version."""
    h = hashlib.sha256()
    for part in (f"abi {ABI_VERSION}", " ".join(COMPILE_FLAGS), " ".join(LINK_FLAGS), nvcc_version(nvcc)):
        h.update(part.encode() + b"\0")
    for f in sources(src):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------
def build(src: Path, out: Path, nvcc: str) -> Path:
    """Compiles every .cu of src in parallel and links `out`; the compiler's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    units = [p for p in sources(src) if p.suffix == ".cu"]
    if not units:
        raise CudaKernelError(f"no .cu files in {src}")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        jobs = []
        for cu in units:
            cmd = [nvcc, *COMPILE_FLAGS, "-I", str(src), "-c", str(cu), "-o", str(Path(tmp) / (cu.stem + ".o"))]
            jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        failed = []
        for cmd, proc in jobs:
            text, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                failed.append(f"$ {' '.join(cmd)}\n{text}")
        if failed:
            raise CudaKernelError("nvcc could not compile csrc/ (the compiler's output follows):\n" + "\n".join(failed))
        part = Path(tmp) / LIB_NAME
        cmd = [nvcc, *LINK_FLAGS, "-o", str(part), *sorted(str(p) for p in Path(tmp).glob("*.o"))]
        link = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if link.returncode != 0:
            raise CudaKernelError(f"nvcc could not link csrc/ (the linker's output follows):\n$ {' '.join(cmd)}\n"
                                  f"{link.stdout}{link.stderr}")
        os.replace(part, out)  # atomic: a concurrent loader sees no file or the whole one
    return out


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
class Library:
    """The loaded shared object: `lib.<symbol>(...)` with the signatures above, and its path."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.lib = ctypes.CDLL(str(self.path))  # RTLD_LOCAL: its CUDA runtime never shadows torch's
        except OSError as e:
            raise CudaKernelError(f"could not load {self.path}: {e}") from None
        for name, (restype, argtypes) in SIGNATURES.items():
            try:
                fn = getattr(self.lib, name)
            except AttributeError:
                raise CudaKernelError(f"{self.path} does not export {name}; it was built from other sources. "
                                      "Delete it (or its cache folder) to rebuild.") from None
            fn.restype, fn.argtypes = restype, argtypes
        version = self.lib.encdec_abi_version()
        if version != ABI_VERSION:
            raise CudaKernelError(f"{self.path} has ABI version {version}, this encdec_fast needs {ABI_VERSION}; "
                                  "delete it (or its cache folder) to rebuild, or install a matching build.")
        size = self.lib.encdec_select_params_size()
        if size != ctypes.sizeof(SelectParams):
            raise CudaKernelError(f"{self.path}: encdec_select_params is {size} bytes, ctypes' mirror "
                                  f"{ctypes.sizeof(SelectParams)}; csrc.py and csrc/encdec_abi.h disagree.")

    def error_string(self, code: int) -> str:
        return self.lib.encdec_error_string(code).decode(errors="replace")

    def device_count(self) -> tuple[int, int]:
        """(cudaError_t, device count) of the library's own first CUDA call."""
        n = _i32(0)
        rc = self.lib.encdec_probe(ctypes.byref(n))
        return rc, n.value


_LOADED: dict[str, Library | CudaKernelError] = {}


def library(src: Path | None = None) -> Library:
    """The library for the installed sources (or `src`): prebuilt, cached, or built now. Raises
    CudaKernelError with the reason when it cannot be had; the outcome is kept for the process."""
    src = Path(src) if src is not None else None
    tag = str(src)
    if tag not in _LOADED:
        try:
            _LOADED[tag] = Library(_locate(src))
        except CudaKernelError as e:
            _LOADED[tag] = e
    got = _LOADED[tag]
    if isinstance(got, CudaKernelError):
        raise got
    return got


def _locate(src: Path | None) -> Path:
    if os.environ.get("ENCDEC_CUDA_LIB"):
        return Path(os.environ["ENCDEC_CUDA_LIB"])
    src = src or source_dir()
    if (src / LIB_NAME).is_file():
        return src / LIB_NAME
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaKernelError("nvcc was not found (looked at $CUDA_HOME/bin, $PATH, /usr/local/cuda/bin), so csrc/ "
                              "cannot be built; install the CUDA toolkit or point CUDA_HOME at it.")
    path = cache_root() / build_key(src, nvcc) / LIB_NAME
    if not path.is_file():
        log.info("encdec_fast: building the CUDA kernels of %s into %s", src, path.parent)
        build(src, path, nvcc)
    return path


# ------------------------------------------------------------------------------------------------
# the switch
# ------------------------------------------------------------------------------------------------
MODES = ("auto", "0", "1")


def mode() -> str:
    value = os.environ.get("ENCDEC_CUDA", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UnsupportedArgumentError(f"ENCDEC_CUDA={value!r} is not understood; use auto (the default: the csrc "
                                       "kernels measured faster), 0 (never) or 1 (all of them, errors raised).")
    return value


def check_device(lib: Library) -> None:
    """Raises CudaKernelError unless the library reaches a GPU it has code for."""
    rc, count = lib.device_count()
    if rc != 0:
        raise CudaKernelError(f"the CUDA kernels' first CUDA call failed with error {rc} ({lib.error_string(rc)}); "
                              "they need an NVIDIA driver and GPU.")
    if count == 0:
        raise CudaKernelError("the CUDA kernels found no GPU.")
    import torch

    if not torch.cuda.is_available():
        raise CudaKernelError("torch has no CUDA device (a CPU build of torch?); the CUDA kernels take torch's CUDA "
                              "tensors and streams.")
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        raise CudaKernelError(f"the CUDA kernels are built for compute capability >= "
                              f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}; this GPU has {cap[0]}.{cap[1]}.")


_SAID: set[str] = set()


def _off(reason: str, level=logging.INFO) -> tuple[str, ...]:
    if reason not in _SAID:
        _SAID.add(reason)
        log.log(level, "encdec_fast: CUDA C++ kernels (csrc) off: %s", reason)
    return ()


def enabled_ops(measured_faster) -> tuple[str, ...]:
    """The op names the Triton table takes from csrc, by ENCDEC_CUDA (see the module docstring)."""
    m = mode()
    if m == "0":
        return _off("ENCDEC_CUDA=0.")
    wanted = OPS if m == "1" else tuple(n for n in OPS if n in measured_faster)
    if not wanted:
        return _off("no csrc op has been measured faster than the Triton path on a GPU yet (decode/ops.py's CSRC_FASTER is "
                    "empty); ENCDEC_CUDA=1 forces them on.")
    try:
        check_device(library())
    except CudaKernelError as e:
        if m == "1":
            raise CudaKernelError(f"ENCDEC_CUDA=1 asks for the CUDA C++ kernels, but {e} "
                                  "Set ENCDEC_CUDA=auto or 0 to run without them.") from None
        return _off(f"{e} (ENCDEC_CUDA=0 silences this.)", logging.WARNING)
    return wanted
