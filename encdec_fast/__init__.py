"""encdec_fast: a fast runtime for Hugging Face EncoderDecoderModel checkpoints."""

from .errors import (CheckpointError, CheckpointNotFoundError, EncDecError, InvalidInputError,
                     UnsupportedArgumentError, UnsupportedModelError)
from .runtime import EncDecModel, load

__all__ = ["load", "EncDecModel", "EncDecError", "CheckpointError", "CheckpointNotFoundError", "InvalidInputError",
           "UnsupportedArgumentError", "UnsupportedModelError"]
__version__ = "0.1.0"
