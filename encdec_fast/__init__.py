"""encdec_fast: a fast runtime for Hugging Face EncoderDecoderModel checkpoints."""

from .engine import Engine
from .errors import (
                     CheckpointError,
                     CheckpointNotFoundError,
                     CudaKernelError,
                     EncDecError,
                     EngineClosedError,
                     EngineUsageError,
                     InvalidInputError,
                     MissingDependencyError,
                     NumericalError,
                     RequestCancelledError,
                     UnsupportedArgumentError,
                     UnsupportedModelError,
)
from .model import EncDecModel, from_transformers, load

__all__ = ["load", "from_transformers", "EncDecModel", "Engine", "EngineClosedError", "EngineUsageError", "EncDecError",
           "CheckpointError", "CheckpointNotFoundError", "CudaKernelError", "InvalidInputError", "MissingDependencyError",
           "NumericalError", "RequestCancelledError", "UnsupportedArgumentError",
           "UnsupportedModelError"]
__version__ = "0.1.0"
