"""Find and read a checkpoint: config, weights and generation config; build the net from them.

Weights are read tensor by tensor (safetensors with plain reads; ``.bin`` only through
``torch.load(weights_only=True)``, memory-mapped for the zip format, read whole for the legacy pre-zip
format, which cannot be mapped; no pickle ever runs code) and assigned tensor by tensor into modules
built on the meta device, so peak memory stays about one copy of the model. weight_map.py says which
Hugging Face tensors fill which buffer; this file finds them (one folder, a tied checkpoint whose decoder
borrows the encoder's tensors, two glued checkpoints, or a transformers model in memory), initialises
what a glued pair lacks, and checks every shape.
"""

from __future__ import annotations

import copy
import ctypes
import json
import mmap
import os
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import prepack, validate
from . import weight_map as wm
from .config import ModelConfig, from_hf
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsupportedModelError,
)

try:  # transformers 5 checks config fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover
    StrictDataclassError = ()
from .modules import EncoderDecoderNet, LayerNorm

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_RESAVE = "re-save the checkpoint with save_pretrained()"


def read_json(f: Path) -> dict:
    """A metadata file that must hold one JSON object."""
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON or bad UTF-8
        raise CheckpointError(f"{str(f)!r} is not valid JSON ({e}); fix it or {_RESAVE}.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(f)!r} must hold a JSON object, got a {type(raw).__name__}; fix it or {_RESAVE}.")
    return raw


def folder(path) -> Path:
    if path is None:
        raise CheckpointNotFoundError("no checkpoint path given; pass the folder a model was saved to with save_pretrained().")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise CheckpointNotFoundError(
            f"checkpoint folder {str(p)!r} does not exist (or is not a folder); pass the folder written by "
            "save_pretrained(), which holds config.json and the weights. Hub names are not downloaded."
        )
    if not (p / "config.json").is_file():
        raise CheckpointNotFoundError(f"{str(p)!r} has no config.json; pass the folder written by save_pretrained().")
    return p


class WeightReader:
    """Lazy access to a folder's tensors by name, whatever the file layout."""

    def __init__(self, path: Path):
        self.path = path
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._left: dict[str, int] | None = None  # reads still to come per name (expect)
        if (path / SAFE).is_file():
            self._index_file(path / SAFE)
        elif (path / SAFE_INDEX).is_file():
            self._index_json(path / SAFE_INDEX)
        elif (path / BIN).is_file():
            self._index_file(path / BIN)
        elif (path / BIN_INDEX).is_file():
            self._index_json(path / BIN_INDEX)
        else:
            raise CheckpointNotFoundError(
                f"{str(path)!r} holds no weights: expected {SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX}. "
                "Save the model with save_pretrained() into this folder."
            )

    def _index_json(self, index: Path):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(index)!r}: weight_map must be a JSON object (tensor name -> shard file), got "
                                  f"{type(weight_map).__name__}; {_RESAVE}.")
        by_shard: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).name != shard:
                raise CheckpointError(f"{str(index)!r}: weight_map[{name!r}] = {shard!r} is not the name of a shard file "
                                      f"in this folder; {_RESAVE}.")
            f = index.parent / shard
            if not f.is_file():
                raise CheckpointNotFoundError(f"shard {shard!r} listed in {index.name} is missing from {str(index.parent)!r}.")
            self._where[name] = f
            by_shard.setdefault(f, []).append(name)
        for f, names in by_shard.items():  # headers only: the index and the shards must agree
            held = set(self._handle(f).keys())
            lacking = [n for n in names if n not in held]
            if lacking:
                raise CheckpointError(f"{str(index)!r} places {lacking[:3]}{' ...' if len(lacking) > 3 else ''} in "
                                      f"{f.name}, which does not hold them; the index and the shards disagree: {_RESAVE}.")

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    self._open[f] = _SafetensorsFile(f)
                else:  # the legacy (pre-zip) format cannot be memory-mapped: it is read whole
                    self._open[f] = _state_dict(f, torch.load(str(f), map_location="cpu", weights_only=True,
                                                              mmap=zipfile.is_zipfile(f)))
            except CheckpointError:
                raise
            except Exception as e:  # corrupt file: say which
                raise CheckpointError(f"cannot read weights file {str(f)!r}: {e}. Re-save the checkpoint.") from None
        return self._open[f]

    def _index_file(self, f: Path):
        h = self._handle(f)
        for name in h.keys():
            self._where[name] = f

    def keys(self) -> set[str]:
        return set(self._where)

    def expect(self, names) -> None:
        """The names the load will get, once per read: a .bin's state dict (read whole for the legacy format)
        drops each tensor after its last read, so that a tensor the load copies (fused, cast or packed) is
        not held twice until the end of the load."""
        self._left = {}
        for n in names:
            self._left[n] = self._left.get(n, 0) + 1

    def get(self, name: str) -> torch.Tensor:
        """The tensor (CPU). safetensors: read into memory of its own; a zip pytorch_model.bin: a view of the
        memory-mapped file."""
        t = self._read(name)
        if self._left is not None and name in self._left:
            self._left[name] -= 1
            h = self._open[self._where[name]]
            if self._left[name] <= 0 and isinstance(h, dict):  # its last read: the state dict lets go of it
                h.pop(name, None)
        return t

    def _read(self, name: str) -> torch.Tensor:
        f = self._where[name]  # a KeyError: the tensor is missing (the caller names it)
        h = self._handle(f)
        try:
            return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  a damaged file
            raise CheckpointError(f"cannot read tensor {name} from {str(f)!r}: {e}; {_RESAVE}.") from None

    def dtype(self) -> torch.dtype:
        for name in self._where:
            t = self._read(name)
            if t.is_floating_point():
                return t.dtype
        return torch.float32


class _SafetensorsFile:
    """A safetensors file read with plain reads: the header (dtype, shape, byte offsets of every tensor)
    once, then each tensor into memory of its own. Not memory-mapped: a mapped file's pages count in the
    process's memory as they are touched, in whole (sometimes large) folios, next to the copies the
    loader makes of transformed tensors, so peak load memory would depend on the page cache's state."""

    def __init__(self, f: Path):
        self.f = f
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:  # (_handle says which file and what to do)
                raise ValueError("too short to be a safetensors file")
            n = struct.unpack("<Q", head)[0]
            if n > os.path.getsize(f) - 8:
                raise ValueError(f"its header length {n} exceeds the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the safetensors header is not a JSON object")
        self.start = 8 + n
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{str(self.f)!r}: tensor {name} has dtype {entry.get('dtype')!r}, which "
                                  f"encdec_fast does not read; {_RESAVE}.")
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=dtype)
        raw = t.reshape(-1).view(torch.uint8)
        if raw.numel() != end - begin:
            raise CheckpointError(f"{str(self.f)!r}: tensor {name} holds {end - begin} bytes but its dtype and "
                                  f"shape need {raw.numel()}; {_RESAVE}.")
        with open(self.f, "rb") as fh:
            fh.seek(self.start + begin)
            if raw.numel() and fh.readinto(raw.numpy()) != raw.numel():
                raise CheckpointError(f"{str(self.f)!r} ends inside tensor {name}: the file is truncated; {_RESAVE}.")
        return t


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _state_dict(f: Path, obj) -> dict:
    """What a .bin must hold: a mapping of tensor names to tensors."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(f)!r} holds a {type(obj).__name__}, not a state dict (tensor name -> tensor); {_RESAVE}.")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{str(f)!r} maps {k!r} to a {type(v).__name__}, not a tensor; a weights file holds "
                                  f"tensors only: {_RESAVE}.")
    return obj


# ------------------------------------------------------------------------------------------------
# assignment
# ------------------------------------------------------------------------------------------------
def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor):
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    expected = mod._buffers[leaf]
    if tuple(expected.shape) != tuple(value.shape):
        raise CheckpointError(
            f"tensor for {name} has shape {tuple(value.shape)} but the config implies {tuple(expected.shape)}; "
            "config.json and the weights disagree: re-save the checkpoint with save_pretrained()."
        )
    mod._buffers[leaf] = value


def _floating(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise CheckpointError(f"tensor {name} is stored as {t.dtype}; encdec_fast loads floating-point weights only "
                              "(float32, float16, bfloat16; quantised checkpoints are not supported). Re-save the "
                              "checkpoint with floating-point weights.")
    return t


def _finite(t: torch.Tensor) -> bool:
    """One pass and no tensor-sized temporary (load memory): min and max propagate NaN."""
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _nonfinite(names: list[str], parts: list[torch.Tensor], dtype) -> Exception:
    what = names[0] if len(names) == 1 else names
    if not all(_finite(p) for p in parts):
        return CheckpointError(f"tensor {what} holds NaN or inf values: the checkpoint is damaged (or its training "
                               f"diverged). Re-save good weights, or pass load(..., check_finite=False) to load it anyway.")
    big = max(float(p.abs().max()) for p in parts)
    return InvalidInputError(f"tensor {what} holds values up to {big:.3g}, beyond the range of {dtype}; load with "
                             "dtype=torch.bfloat16 or torch.float32.")


class _MappedPages:
    """Gives back the resident pages of memory-mapped source tensors once they were copied (Linux).

    A zip pytorch_model.bin is memory-mapped: a weight used as it is stays a view of the file, but one
    that is transformed (fused QKV, transposed Conv1D, another dtype) is
    copied, and the pages of its source, read for the copy, would stay resident next to the copy. They
    are file-backed and never written, so madvise(MADV_DONTNEED) drops them safely: a later read maps
    them from the file again. Only ranges inside a file mapping (/proc/self/maps) are touched."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] | None = None
        self.libc = None
        if sys.platform.startswith("linux"):
            try:
                self.libc = ctypes.CDLL(None, use_errno=True)
                self.page = mmap.PAGESIZE
            except OSError:
                self.libc = None

    def _file_ranges(self) -> list[tuple[int, int]]:
        out = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().startswith("/"):  # backed by a file
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
        return out

    def release(self, t: torch.Tensor):
        if self.libc is None or t.device.type != "cpu" or t.numel() == 0:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo, hi = -(-start // self.page) * self.page, end // self.page * self.page  # whole pages inside
        if hi <= lo:
            return
        if self.ranges is None:
            self.ranges = self._file_ranges()
        if not any(a <= lo and hi <= b for a, b in self.ranges):
            return
        self.libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED

    freed = 0  # bytes of tensors freed since the last trim

    def trim(self, nbytes: int, every: int = 64 << 20):
        """Counts nbytes of tensors just freed, and every `every` bytes returns the heap's free memory to
        the system (glibc malloc_trim). Loading frees each source right after its copy is made (a fused
        QKV, a packed weight); glibc raises its mmap threshold after the first such free and keeps later
        freed chunks in the heap, so without this the resident peak grew by ~8-15% of the weights
        (bert-base + gpt2 packed: 1.32x instead of 1.16x, plain 1.08x instead of 1.01x)."""
        self.freed += nbytes
        trim = getattr(self.libc, "malloc_trim", None) if self.libc is not None else None
        if trim is not None and self.freed >= every:
            trim(0)
            self.freed = 0


def _shared_key(hf_names, fn):
    """assign()'s identity of a buffer's source: buffers with the same key and fn wm.same share one tensor
    (read once); any other transform is read and computed per buffer."""
    return tuple(hf_names), fn.__name__


def assign(model, plan: wm.Plan, fetch: Callable[[str], torch.Tensor], *, device, dtype, check_finite: bool = True,
           pack: frozenset[str] = frozenset()):
    """Fill every buffer of `model` (built on meta) from the plan. fetch(hf_name) returns a CPU tensor.
    Tensors listed under the same HF names are shared (tied weights stay one tensor). Every tensor must
    be floating point and, with check_finite, finite once cast to dtype. The buffers named in `pack` are
    reordered for oneDNN as they arrive (prepack.py), so that at most one plain copy of a packed weight is
    alive at a time. The mapped pages of sources that were copied are given back (_MappedPages)."""
    shared: dict = {}  # key -> the plain tensor, for buffers read plain (the word embeddings, tied)
    packed: dict = {}  # key -> its packed tensor (tie_encoder_decoder: several projections, one tensor)
    pages = _MappedPages()
    for ours, (hf_names, fn) in plan.items():
        key = _shared_key(hf_names, fn)
        if key in shared or key in packed:
            if ours in pack:
                if key not in packed:  # an LM head tied to the word embeddings: its own packed copy
                    packed[key] = prepack.pack_tensor(shared[key])
                _set_buffer(model, ours, packed[key])
            else:
                if key not in shared:
                    shared[key] = packed[key].to_dense()
                _set_buffer(model, ours, shared[key])
            continue
        parts = [_floating(h, fetch(h)) for h in hf_names]
        t = fn(*parts).to(device=device, dtype=dtype).contiguous()
        if check_finite and not _finite(t):
            raise _nonfinite(hf_names, parts, dtype)
        if ours in pack:
            _set_buffer(model, ours, t)  # checks the shape
            t = prepack.pack_tensor(t)
            if fn is wm.same:
                packed[key] = t
        elif fn is wm.same:
            shared[key] = t
        _set_buffer(model, ours, t)
        freed = 0
        for p in parts:  # copied (or packed): its source is not needed
            if t.is_mkldnn or p.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                pages.release(p)
                freed += p.numel() * p.element_size()
        parts = p = None  # the sources (and a packed weight's plain tensor) are gone now
        pages.trim(freed)


def share_tied_head(model):
    """One tensor for the word embeddings and an LM head stored equal to them (memory, not numbers)."""
    dec = model.decoder
    w, h = dec.embed.word, dec.head.weight
    if w is not h and not h.is_mkldnn and w.shape == h.shape and torch.equal(w, h):  # a packed head stays apart
        dec.head._buffers["weight"] = w


def check_complete(model):
    left = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if left:
        raise CheckpointError(f"internal: buffers left unassigned: {left[:5]}")


def report_missing(where: str, missing: list[str], unexpected: list[str]):
    msg = []
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        msg.append(f"missing tensors {missing[:10]}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
        msg.append(f"unexpected tensors {unexpected[:10]}{more}")
    if msg:
        raise CheckpointError(
            f"{where}: {'; '.join(msg)}. The weights do not match config.json; re-save the model with "
            "save_pretrained() (or load encoder and decoder checkpoints separately with load(encoder=..., decoder=...))."
        )


# ------------------------------------------------------------------------------------------------
# sources: what load() reads, from one folder or from two glued checkpoints
# ------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A checkpoint resolved to our names: its configs, the plan, and a fetch(HF name) -> CPU tensor."""

    hf_config: object  # transformers EncoderDecoderConfig
    cfg: ModelConfig
    plan: wm.Plan
    fetch: Callable[[str], torch.Tensor]
    stored_dtype: torch.dtype
    gen_dir: Path | None  # where generation_config.json is looked for (None: in memory)
    folder: Path | None  # the EncoderDecoderModel folder (None when glued or in memory)
    init_missing: set[str] = field(default_factory=set)  # HF names only the glued model has
    gen_config: object = None  # the in-memory model's GenerationConfig


def read_config(path: Path):
    from transformers import AutoConfig

    file = path / "config.json"
    validate.config_fields(read_json(file), str(file))
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (StrictDataclassError, TypeError) as e:  # a field of the wrong type that our table does not know
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{str(file)!r}: {msg}; fix the file or {_RESAVE}.") from None
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(
            f"cannot read {str(path / 'config.json')!r} as a transformers config: {e}. "
            "encdec_fast reads EncoderDecoderModel folders (see the README's supported checkpoints)."
        ) from None


def open_folder(path) -> Source:
    """An EncoderDecoderModel folder written by save_pretrained()."""
    root = folder(path)
    hf = read_config(root)
    if getattr(hf, "model_type", None) != "encoder-decoder":
        raise UnsupportedModelError(
            f"{str(root)!r} holds a {getattr(hf, 'model_type', '?')!r} model, not an EncoderDecoderModel. "
            "Load encoder and decoder checkpoints separately with load(encoder=..., decoder=...), or use "
            "transformers for native seq2seq models (T5, BART, ...).")
    cfg = from_hf(hf)
    reader = WeightReader(root)
    keys = reader.keys()
    plan = wm.full_plan(cfg, keys)
    names, tied = keys, {}
    if cfg.tie_encoder_decoder:  # checkpoints saved with tied halves drop the decoder's copies
        base = "decoder." + wm.DECODER_BASE[cfg.decoder.family]
        tied = {base + k[len("encoder."):]: k for k in keys if k.startswith("encoder.")}
        names = keys | set(tied)

    def resolve(n):  # the stored name of a tensor (a tied decoder's tensors are the encoder's)
        return n if n in keys else tied.get(n, n)

    def fetch(n):
        return reader.get(resolve(n))

    missing, unexpected = wm.missing_and_unexpected(plan, names)
    report_missing(str(root), missing, unexpected)
    dtype = reader.dtype()
    reader.expect(resolve(n) for n in _reads(plan))
    return Source(hf, cfg, plan, fetch, dtype, root, root)


def open_pair(encoder, decoder) -> Source:
    """An encoder and a decoder checkpoint glued like EncoderDecoderModel.from_encoder_decoder_pretrained."""
    from transformers import EncoderDecoderConfig

    if encoder is None or decoder is None:
        raise InvalidInputError("gluing needs both encoder= and decoder= checkpoint folders.")
    ef, df = folder(encoder), folder(decoder)
    ecfg, dcfg = read_config(ef), read_config(df)
    for c, role in ((ecfg, "encoder"), (dcfg, "decoder")):
        if getattr(c, "model_type", None) == "encoder-decoder":
            raise InvalidInputError(f"{role}= got an EncoderDecoderModel folder; pass it as load(path).")
    dcfg.is_decoder, dcfg.add_cross_attention = True, True
    hf = EncoderDecoderConfig.from_encoder_decoder_configs(ecfg, dcfg)
    cfg = from_hf(hf)
    er, dr = WeightReader(ef), WeightReader(df)
    base = wm.DECODER_BASE[cfg.decoder.family]
    if cfg.decoder.family == "bart" and any(k.startswith(("model.encoder.", "encoder.")) for k in dr.keys()):
        raise UnsupportedModelError(
            f"decoder {str(df)!r} holds a whole BART model (encoder and decoder); transformers 5 loads it into "
            "BartForCausalLM without its word embeddings (they come out random). Build a BartForCausalLM with the "
            "decoder's weights and the shared embeddings, save it, and pass that folder as decoder=.")
    ealias = wm.alias(er.keys(), wm.ENCODER_BASES, "encoder.", wm.ENCODER_HEADS, "encoder.")
    dalias = wm.alias(dr.keys(), (base,), "decoder." + base, wm.DECODER_HEADS, "decoder.")
    names = set(ealias) | set(dalias)
    plan = wm.full_plan(cfg, names)
    missing, unexpected = wm.missing_and_unexpected(plan, names)
    unexpected = [u for u in unexpected if not u.startswith(tuple("encoder." + h for h in wm.ENCODER_HEADS))]
    enc_missing = [m for m in missing if not m.startswith(("decoder.", "enc_to_dec_proj."))]
    report_missing(f"encoder {str(ef)!r} / decoder {str(df)!r}", enc_missing, unexpected)

    def fetch(n):
        return er.get(ealias[n]) if n in ealias else dr.get(dalias[n])

    dtype = er.dtype()
    reads = _reads(plan)
    er.expect(ealias[n] for n in reads if n in ealias)
    dr.expect(dalias[n] for n in reads if n not in ealias and n in dalias)
    return Source(hf, cfg, plan, fetch, dtype, df, None, set(missing))


def _reads(plan: wm.Plan) -> list[str]:
    """The HF names assign() fetches, once per read: a source shared by several buffers (wm.same) is read
    once, any other as often as a buffer uses it (_shared_key)."""
    seen, out = set(), []
    for hf_names, fn in plan.values():
        key = _shared_key(hf_names, fn)
        if fn is not wm.same or key not in seen:
            seen.add(key)
            out.extend(hf_names)
    return out


def open_module(model) -> Source:
    """A transformers EncoderDecoderModel in memory (for example right after fine-tuning), read through
    the same plan as its save_pretrained() folder. Every tensor is copied: the net shares no storage with
    the model, and later changes to either leave the other alone."""
    from transformers import EncoderDecoderModel

    if not isinstance(model, EncoderDecoderModel):
        raise UnsupportedModelError(
            f"from_transformers() takes a transformers EncoderDecoderModel, got {type(model).__name__}; for a "
            "folder use encdec_fast.load(path).")
    hf = copy.deepcopy(model.config)
    cfg = from_hf(hf)
    sd = model.state_dict()
    on_meta = sorted(k for k, t in sd.items() if t.is_meta)
    if on_meta:
        raise CheckpointError(f"the model holds tensors on the meta device ({on_meta[:3]}...): it is offloaded or was "
                              "never materialised. Load it fully into memory first, or save it and use load(path).")
    keys = set(sd)
    plan = wm.full_plan(cfg, keys)
    missing, unexpected = wm.missing_and_unexpected(plan, keys)
    report_missing(f"transformers model {type(model).__name__}", missing, unexpected)

    def fetch(n):  # a clone: nothing may share storage with the caller's model
        return sd[n].detach().clone()

    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    return Source(hf, cfg, plan, fetch, dtype, None, None, gen_config=copy.deepcopy(model.generation_config))


def _init_missing(net, plan: wm.Plan, missing: set[str], seed: int, std: float, dtype, device) -> list[str]:
    """Reproducibly initialise every buffer whose HF tensors are missing; returns the HF names."""
    g = torch.Generator().manual_seed(seed)
    done = []
    for ours, (hf_names, _) in plan.items():
        if not any(h in missing for h in hf_names):
            continue
        mod_name, _, leaf = ours.rpartition(".")
        mod = net.get_submodule(mod_name)
        shape = mod._buffers[leaf].shape
        if leaf == "bias":
            t = torch.zeros(shape)
        elif isinstance(mod, LayerNorm):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        mod._buffers[leaf] = t.to(device=device, dtype=dtype)
        done += [h for h in hf_names if h in missing]
    return done


def build_net(src: Source, *, device, dtype, seed: int, check_finite: bool = True,
              pack: bool = False) -> EncoderDecoderNet:
    """The net on the meta device, then every buffer assigned from the checkpoint (or initialised); with
    pack, its projection weights reordered for oneDNN (prepack.py) as they are assigned."""
    with torch.device("meta"):
        net = EncoderDecoderNet(src.cfg)
    plan = src.plan
    if src.init_missing:
        dec = src.hf_config.decoder
        std = getattr(dec, "initializer_range", None) or getattr(dec, "init_std", None) or 0.02  # BART: init_std
        done = _init_missing(net, plan, src.init_missing, seed, std, dtype, device)
        plan = {k: v for k, v in plan.items() if not any(h in src.init_missing for h in v[0])}
        warnings.warn(
            f"the glued checkpoints lack {len(done)} tensors that only the combined model has (decoder "
            f"cross-attention, enc_to_dec_proj); initialised from seed {seed}. Fine-tune before use, as after "
            f"from_encoder_decoder_pretrained: {sorted(done)}", stacklevel=4)  # load() -> _build() -> build_net(): the caller of load()
    try:
        assign(net, plan, src.fetch, device=device, dtype=dtype, check_finite=check_finite,
               pack=prepack.slot_names(net) if pack else frozenset())
    except KeyError as e:
        raise CheckpointError(f"tensor {e} is missing from the checkpoint; re-save it with save_pretrained().") from None
    check_complete(net)
    if src.cfg.decoder.tie_word_embeddings:
        share_tied_head(net)
    if pack:  # the tensors initialised rather than read (a glued pair's cross-attention)
        prepack.pack(net)
    return net


def generation_config(src: Source):
    """The checkpoint's generation_config.json, else one derived from config.json (as transformers does)."""
    from transformers import GenerationConfig

    if src.gen_dir is None:
        return copy.deepcopy(src.gen_config) if src.gen_config is not None else GenerationConfig.from_model_config(src.hf_config)
    f = src.gen_dir / "generation_config.json"
    own = f.is_file()
    where = f if own else src.gen_dir / "config.json"  # without the file, the values come from config.json
    fix = f"fix or delete {str(f)!r}" if own else f"fix {str(where)!r}"
    try:
        if own:
            validate.generation_values(read_json(f), f"{str(f)!r}: ", CheckpointError, fix)
            gc = GenerationConfig.from_pretrained(str(src.gen_dir), local_files_only=True)
        else:
            gc = GenerationConfig.from_model_config(src.hf_config)
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {str(where)!r}: {e}; {fix}.") from None
    validate.generation_values(gc.to_dict(), f"{str(where)!r}: ", CheckpointError, fix)
    return gc
