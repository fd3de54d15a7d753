"""pyfastrl: custom-kernel ops for GRPO-style RL post-training of language models.

Public API:
    PrefixGroupLayout         -- the packed shared-prefix batch layout (built once per batch)
    prefix_grouped_attention  -- attention over that layout, equal to repeating every prompt
"""
from pyfastrl.layout import PrefixGroupLayout
from pyfastrl.ops.prefix_attention import prefix_grouped_attention

__version__ = "0.1.0"
__all__ = ["PrefixGroupLayout", "prefix_grouped_attention", "__version__"]
