"""pyfastrl: custom-kernel ops for GRPO-style RL post-training of language models.

Public API:
    PrefixGroupLayout         -- the packed shared-prefix batch layout (built once per batch)
    PrefixTreeLayout          -- prompts shared at several levels (a forest of segments); from_sequences
                                 builds it from token ids by sharing every common prefix
    prefix_grouped_attention  -- attention over either layout, equal to repeating every prompt
    verify_equivalence        -- model-level check: grouped vs repeated batch on a transformers model
                                 (pyfastrl.integrations.transformers; imports transformers on first use)
    grpo_advantages           -- group-normalised advantages (exact 0 for identical rewards)
    grpo_loss                 -- clipped-surrogate (+ KL) GRPO loss of per-token log-probs, with metrics
    fused_linear_grpo_loss    -- the same loss from hidden states and the LM head, logits never materialised
    selective_logprobs        -- the fused log-probs (and entropies) alone, for old/reference policies
    local_linear_attention    -- causal local linear attention (LLA), exact gradient incl. the ridge lambda
    local_linear_attention_decode -- one LLA generation step per sequence over a (ragged) KV cache
    nn.LocalLinearAttention   -- the same as a module with a learnable per-head lambda
"""
from pyfastrl.layout import PrefixGroupLayout
from pyfastrl.tree_layout import PrefixTreeLayout
from pyfastrl.ops.fused_linear_grpo_loss import fused_linear_grpo_loss, selective_logprobs
from pyfastrl.ops.grpo_advantages import grpo_advantages
from pyfastrl.ops.grpo_loss import grpo_loss
from pyfastrl.ops.local_linear_attention import local_linear_attention
from pyfastrl.ops.local_linear_attention_decode import local_linear_attention_decode
from pyfastrl.ops.prefix_attention import prefix_grouped_attention

__version__ = "0.1.0"
__all__ = [
    "PrefixGroupLayout",
    "PrefixTreeLayout",
    "prefix_grouped_attention",
    "verify_equivalence",
    "grpo_advantages",
    "grpo_loss",
    "fused_linear_grpo_loss",
    "selective_logprobs",
    "local_linear_attention",
    "local_linear_attention_decode",
    "__version__",
]


def __getattr__(name):
    # Lazy, so that importing pyfastrl does not import transformers.
    if name == "verify_equivalence":
        from pyfastrl.integrations.transformers import verify_equivalence

        return verify_equivalence
    raise AttributeError(f"module 'pyfastrl' has no attribute {name!r}")
