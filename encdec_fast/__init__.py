"""encdec_fast: a fast runtime for Hugging Face EncoderDecoderModel checkpoints."""

from .engine import Engine
from .errors import (
                     CheckpointError,
                     CheckpointNotFoundError,
                     CudaKernelError,
                     EncDecError,
                     EngineClosedError,
                     InvalidInputError,
                     UnsupportedArgumentError,
                     UnsupportedModelError,
)
from .model import EncDecModel, load

__all__ = ["load", "EncDecModel", "Engine", "EngineClosedError", "EncDecError", "CheckpointError",
           "CheckpointNotFoundError", "CudaKernelError", "InvalidInputError", "UnsupportedArgumentError", "UnsupportedModelError"]
__version__ = "0.1.0"
