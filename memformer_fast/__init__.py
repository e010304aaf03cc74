"""memformer_fast: Memformer with fused Triton kernels and Memory Replay Back-Propagation."""

from . import functional, mrbp
from .clipping import SpikeClip
from .config import MemformerConfig
from .layers import DecoderBlock, MemoryBlock, MemoryReader, MemoryWriter
from .model import Memformer, MemformerOutput
from .replay import ReplayBuffer

__version__ = "0.1.0"

__all__ = [
    "DecoderBlock",
    "Memformer",
    "MemformerConfig",
    "MemformerOutput",
    "MemoryBlock",
    "MemoryReader",
    "MemoryWriter",
    "ReplayBuffer",
    "SpikeClip",
    "__version__",
    "functional",
    "mrbp",
]
