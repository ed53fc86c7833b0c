"""encdec_fast: a fast runtime for Hugging Face EncoderDecoderModel checkpoints."""

from .engine import Engine
from .errors import (
                     CheckpointError,
                     CheckpointNotFoundError,
                     EncDecError,
                     EngineClosedError,
                     InvalidInputError,
                     RequestCancelledError,
                     UnsupportedArgumentError,
                     UnsupportedModelError,
)
from .model import EncDecModel, load

__all__ = ["load", "EncDecModel", "Engine", "EngineClosedError", "EncDecError", "CheckpointError",
           "CheckpointNotFoundError", "InvalidInputError", "RequestCancelledError", "UnsupportedArgumentError",
           "UnsupportedModelError"]
__version__ = "0.1.0"
