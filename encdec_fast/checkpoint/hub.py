"""Hub ids: what load() is given, resolved to a local folder before any checkpoint is opened.

A path that exists is a folder, and so is every os.PathLike; a string shaped like a Hub repo id
("org/name", or a bare legacy name like "gpt2") that is not a folder here is a Hub id. A Hub id resolves
through huggingface_hub to its snapshot folder in the Hugging Face cache:

  1. the cache first: the revision's snapshot (a branch or tag through refs/, a commit hash directly),
     used as it is when it holds everything a load reads (config.json and complete weights);
  2. offline (HF_HUB_OFFLINE=1 or local_files_only=True), nothing else: a missing or incomplete snapshot
     is a CheckpointNotFoundError that says how to fetch it;
  3. online, only the files a load reads: config.json, generation_config.json, one weight format
     (safetensors preferred, .bin otherwise; the shards an index lists) and the tokenizer files.

checkpoint/sources.py then reads the folder like any other, and the model's .path is this folder (the
Engine loads the tokenizer from it).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from ..errors import CheckpointNotFoundError, InvalidInputError
from .files import BIN, BIN_INDEX, SAFE, SAFE_INDEX, read_json

META = ("config.json", "generation_config.json")
WEIGHTS = (SAFE, SAFE_INDEX, BIN, BIN_INDEX)  # in order of preference
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
             "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(value) -> bool:
    """A string shaped like a Hub repo id ("org/name" or "name"): no path syntax ("/x", "./x", "~", "a/b/c")."""
    if not isinstance(value, str):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(value)
    except Exception:  # noqa: BLE001  HFValidationError (and, defensively, anything it may raise)
        return False
    return True


def offline(local_files_only: bool | None = None) -> bool:
    """Downloads off: local_files_only=True, or HF_HUB_OFFLINE set (read now, not at huggingface_hub's import)."""
    if local_files_only:
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_root(cache_dir=None) -> Path:
    """cache_dir, else $HF_HUB_CACHE (read now), else huggingface_hub's default (HF_HOME/hub)."""
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE")
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    return Path(os.fspath(cache_dir)).expanduser()


def check_options(revision, token, cache_dir, local_files_only):
    """Types of load()'s Hub arguments (ignored for a local folder, as transformers ignores them)."""
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise InvalidInputError(f"revision must be a branch, tag or commit hash (a non-empty str), got {revision!r}.")
    if token is not None and not isinstance(token, (str, bool)):
        raise InvalidInputError(f"token must be a Hugging Face access token (str), True (the saved login) or False, "
                                f"got {type(token).__name__}.")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise InvalidInputError(f"cache_dir must be a folder path (str or os.PathLike), got "
                                f"{type(cache_dir).__name__}.")
    if local_files_only is not None and not isinstance(local_files_only, bool):
        raise InvalidInputError(f"local_files_only must be True or False, got {local_files_only!r}.")


def resolve(value, *, revision=None, token=None, cache_dir=None, local_files_only=None) -> Path | None:
    """load()'s path, encoder or decoder argument -> a local folder (not checked here: sources.py does),
    or None for None. A Hub id comes back as its snapshot folder, downloaded first when allowed."""
    if value is None:
        return None
    if not isinstance(value, str):  # an os.PathLike is always a local path
        return Path(os.fspath(value)).expanduser()
    local = Path(value).expanduser()
    if local.exists() or not is_hub_id(value):
        return local
    return snapshot(value, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)


def snapshot(repo_id: str, *, revision=None, token=None, cache_dir=None, local_files_only=None) -> Path:
    """The snapshot folder of a Hub model holding what a load reads: the cache's if complete, else downloaded."""
    cache = cache_root(cache_dir)
    rev = revision or "main"
    folder = cached_snapshot(repo_id, rev, cache)
    missing = missing_files(folder) if folder is not None else None
    if missing == []:
        return folder
    if offline(local_files_only):
        why = "HF_HUB_OFFLINE is set" if not local_files_only else "local_files_only=True"
        command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "") + (
            f" --cache-dir {str(cache)!r}" if cache_dir is not None else "")
        fetch = f"Fetch it once with `{command}`, or load it online (unset HF_HUB_OFFLINE, drop local_files_only)"
        if folder is None:
            raise CheckpointNotFoundError(
                f"{repo_id!r} is not a local folder, and the Hub model {repo_id!r} (revision {rev!r}) is not in the "
                f"Hugging Face cache {str(cache)!r}; downloads are off ({why}). {fetch}; or pass cache_dir= if it was "
                "downloaded elsewhere.")
        raise CheckpointNotFoundError(
            f"the cached snapshot of {repo_id!r} (revision {rev!r}) in {str(folder)!r} lacks {missing[:5]}; downloads "
            f"are off ({why}). {fetch}.")
    return download(repo_id, revision=revision, token=token, cache=cache)


def cached_snapshot(repo_id: str, revision: str, cache: Path) -> Path | None:
    """The cache's snapshot folder of repo_id at revision (a branch or tag through refs/, or a commit hash),
    or None when the cache does not know it."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = revision
    if not _COMMIT.match(revision):
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def missing_files(folder: Path) -> list[str]:
    """What a load would read and the folder lacks: config.json, and the weights of the first format
    present (an index with every shard it lists)."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    for name in WEIGHTS:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            missing += [s for s in _shards(f) if not (folder / s).is_file()]
        return missing
    return missing + [f"the weights ({' / '.join(WEIGHTS)})"]


def _shards(index: Path) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        return []  # the WeightReader reports the malformed index when the load reads it
    return sorted({s for s in weight_map.values() if isinstance(s, str) and s and Path(s).name == s})


def download(repo_id: str, *, revision, token, cache: Path) -> Path:
    """Only the files a load reads, into the cache; -> the snapshot folder."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    where = f"Hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision, token=token)
        files = {s.rfilename for s in (info.siblings or ())}
        if "config.json" not in files:
            raise CheckpointNotFoundError(f"the {where} has no config.json: it is not a transformers model saved with "
                                          "save_pretrained(); pass an EncoderDecoderModel repository (or two halves "
                                          "with load(encoder=..., decoder=...)).")
        weights = next((f for f in WEIGHTS if f in files), None)
        if weights is None:
            raise CheckpointNotFoundError(f"the {where} holds no weights ({', '.join(WEIGHTS)}); it cannot be loaded.")
        want = [f for f in META + TOKENIZER if f in files] + [weights]
        if weights.endswith(".index.json"):
            index = hf_hub_download(repo_id, weights, revision=info.sha, cache_dir=str(cache), token=token)
            want += _shards(Path(index))
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), token=token,
                                   allow_patterns=[glob.escape(f) for f in want])
    except CheckpointNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  the Hub's and the network's errors, named below
        raise _download_error(e, repo_id, where) from None
    return Path(folder)


def _download_error(e: Exception, repo_id: str, where: str) -> CheckpointNotFoundError:
    from huggingface_hub import errors as hub

    msg = " ".join(str(e).split())[:300]
    if isinstance(e, hub.GatedRepoError):
        why = (f"the {where} is gated: accept its terms on huggingface.co, then pass token= or log in with "
               "`hf auth login`")
    elif isinstance(e, hub.RevisionNotFoundError):
        why = f"the {where} has no such revision; pass an existing branch, tag or commit hash as revision="
    elif isinstance(e, hub.RepositoryNotFoundError):
        why = (f"{repo_id!r} is not a local folder, and the Hub has no model {repo_id!r} that this login can see "
               "(check the name, or pass token= / log in with `hf auth login` for a private one)")
    else:
        why = (f"could not download the {where} ({type(e).__name__}: {msg}); check the network, or fetch it with "
               f"`hf download {repo_id}` and load with HF_HUB_OFFLINE=1")
    return CheckpointNotFoundError(why + ".")
