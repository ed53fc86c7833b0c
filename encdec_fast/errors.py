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
    """A bad value: token ids, masks, labels, generation or engine arguments of the wrong type or range."""


class UnsupportedArgumentError(EncDecError, NotImplementedError):
    """A generation or runtime argument encdec_fast does not implement (yet)."""


class EngineClosedError(EncDecError, RuntimeError):
    """The engine was closed before this request finished (or it was submitted after close())."""


class CudaKernelError(EncDecError, RuntimeError):
    """The CUDA C++ kernels (csrc/) were asked for (ENCDEC_CUDA=1) or called, and could not be built, loaded or
    run: the message says why (nvcc's own output for a compiler error, the CUDA error for a failed launch)."""


class EngineUsageError(EncDecError, RuntimeError):
    """The engine was called in a way that cannot work, e.g. waiting on it from its own done-callback."""


class NumericalError(EncDecError, FloatingPointError):
    """The model produced NaN or inf logits (e.g. float16 overflow): the request fails instead of emitting junk."""


class RequestCancelledError(EncDecError, CancelledError):
    """An engine request was cancelled while it ran (its stream closed, its future cancelled, or its
    HTTP client gone); a concurrent.futures.CancelledError, like a request cancelled before it started."""


class MissingDependencyError(EncDecError, ImportError):
    """An optional feature's package is not installed (the message names the pip extra to install)."""
