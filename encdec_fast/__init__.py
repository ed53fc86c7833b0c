"""encdec_fast: a fast runtime for Hugging Face EncoderDecoderModel checkpoints."""

from .errors import (CheckpointError, CheckpointNotFoundError, EncDecError, InvalidInputError,
                     UnsupportedArgumentError, UnsupportedModelError)
from .engine import Engine, EngineClosedError
from .runtime import EncDecModel, load

__all__ = ["load", "EncDecModel", "Engine", "EngineClosedError", "EncDecError", "CheckpointError",
           "CheckpointNotFoundError", "InvalidInputError", "UnsupportedArgumentError", "UnsupportedModelError"]
__version__ = "0.1.0"
