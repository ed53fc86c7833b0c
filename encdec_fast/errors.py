"""The exceptions a user can cause. Each names the cause and the fix in its message."""

from concurrent.futures import CancelledError


class EncDecError(Exception):
    """Base class of every error encdec_fast raises on purpose."""


class CheckpointNotFoundError(EncDecError, FileNotFoundError):
    """The checkpoint folder, its config.json or its weights are missing."""


class CheckpointError(EncDecError, ValueError):
    """The checkpoint is present but unusable: missing or unexpected tensors, wrong shapes, bad config."""


class UnsupportedModelError(EncDecError, ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


class InvalidInputError(EncDecError, ValueError):
    """Bad model input: empty batch, non-integer or out-of-range token ids, too long, bad mask."""


class UnsupportedArgumentError(EncDecError, NotImplementedError):
    """A generation or runtime argument encdec_fast does not implement (yet)."""


class EngineClosedError(EncDecError, RuntimeError):
    """The engine was closed before this request finished (or it was submitted after close())."""


class RequestCancelledError(EncDecError, CancelledError):
    """An engine request was cancelled while it ran (its stream closed, its future cancelled, or its
    HTTP client gone); a concurrent.futures.CancelledError, like a request cancelled before it started."""



class MissingDependencyError(EncDecError, ImportError):
    """An optional feature's package is not installed (the message names the pip extra to install)."""
