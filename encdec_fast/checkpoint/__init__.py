"""Find and read a checkpoint, and build the net from it, one job per module:

  files.py       weight formats and metadata files, read tensor by tensor
  weight_map.py  the name table: which Hugging Face tensors fill each of our buffers
  sources.py     what load() reads: a folder, a glued encoder/decoder pair, a model in memory
  assign.py      buffers filled on a net built on the meta device; load-time weight transforms
  memory.py      memory given back to the system while loading
"""

from .assign import WeightTransform, build_net
from .files import WeightReader
from .sources import Source, generation_config, open_folder, open_module, open_pair

__all__ = ["Source", "WeightReader", "WeightTransform", "build_net", "generation_config", "open_folder",
           "open_module", "open_pair"]
