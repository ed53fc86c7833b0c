"""Checkpoint files: the weight formats (safetensors, sharded indexes, zip and legacy ``pytorch_model.bin``)
read tensor by tensor, and the JSON metadata beside them.

safetensors files are read with plain reads; a ``.bin`` only through ``torch.load(weights_only=True)``
(memory-mapped in the zip format, read whole in the legacy pre-zip format, which cannot be mapped), so no
pickle ever runs code.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointNotFoundError

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
RESAVE = "re-save the checkpoint with save_pretrained()"


def read_json(f: Path) -> dict:
    """A metadata file that must hold one JSON object."""
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON or bad UTF-8
        raise CheckpointError(f"{str(f)!r} is not valid JSON ({e}); fix it or {RESAVE}.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(f)!r} must hold a JSON object, got a {type(raw).__name__}; fix it or {RESAVE}.")
    return raw


def folder(path) -> Path:
    if path is None:
        raise CheckpointNotFoundError("no checkpoint path given; pass the folder a model was saved to with save_pretrained().")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise CheckpointNotFoundError(
            f"checkpoint folder {str(p)!r} does not exist (or is not a folder); pass the folder written by "
            "save_pretrained(), which holds config.json and the weights, or a Hub id (\"org/name\")."
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
                                  f"{type(weight_map).__name__}; {RESAVE}.")
        by_shard: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).name != shard:
                raise CheckpointError(f"{str(index)!r}: weight_map[{name!r}] = {shard!r} is not the name of a shard file "
                                      f"in this folder; {RESAVE}.")
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
                                      f"{f.name}, which does not hold them; the index and the shards disagree: {RESAVE}.")

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
            raise CheckpointError(f"cannot read tensor {name} from {str(f)!r}: {e}; {RESAVE}.") from None

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
                                  f"encdec_fast does not read; {RESAVE}.")
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=dtype)
        raw = t.reshape(-1).view(torch.uint8)
        if raw.numel() != end - begin:
            raise CheckpointError(f"{str(self.f)!r}: tensor {name} holds {end - begin} bytes but its dtype and "
                                  f"shape need {raw.numel()}; {RESAVE}.")
        with open(self.f, "rb") as fh:
            fh.seek(self.start + begin)
            if raw.numel() and fh.readinto(raw.numpy()) != raw.numel():
                raise CheckpointError(f"{str(self.f)!r} ends inside tensor {name}: the file is truncated; {RESAVE}.")
        return t


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _state_dict(f: Path, obj) -> dict:
    """What a .bin must hold: a mapping of tensor names to tensors."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(f)!r} holds a {type(obj).__name__}, not a state dict (tensor name -> tensor); {RESAVE}.")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{str(f)!r} maps {k!r} to a {type(v).__name__}, not a tensor; a weights file holds "
                                  f"tensors only: {RESAVE}.")
    return obj


