"""The trainer's micro-batches and the tokens each layout stores.

A micro-batch of whole groups (prompt i with its completions) is built as:
- the repeated-prompt batch (``use_prefix_grouping=False``, or a local-linear-attention policy):
  one padded row per completion;
- a prefix-tree batch (``use_prefix_tree``) when the micro-batch's prompts share more than
  themselves with each other (a conversation's successive turns, whose earlier turns are a shared
  path; identical prompts in different groups): the trie of every sequence stores each shared
  prefix once, completions' common first tokens included;
- else the prefix-grouped batch: each prompt once, followed by its completions.

Which rows share a micro-batch: a rollout takes ``prompts_per_step`` rows of a seeded permutation
of the dataset (with ``shuffle_dataset=False``: the next rows in the dataset's order) and cuts them,
in order, into micro-batches of ``per_device_train_batch_size / num_generations`` prompts. So without
shuffling, rows stored consecutively share a micro-batch when their count divides that number and
the dataset is laid out in blocks of it (a conversation's successive turns, for instance).

All three give the same completion tokens in the same order (completion by completion), so the
hidden states, log-probs and loss of one are those of another up to float rounding.
"""
from __future__ import annotations

import torch

from pyfastrl.integrations import transformers as pft
from pyfastrl.tree_layout import PrefixTreeLayout


def grouped_tokens(prompt_ids: list, completion_ids: list) -> int:
    """Tokens of the prefix-grouped batch: each prompt once plus every completion."""
    return sum(p.numel() + sum(c.numel() for c in group) for p, group in zip(prompt_ids, completion_ids))


def _sequences(prompt_ids: list, completion_ids: list) -> list:
    return [torch.cat([p, c]) for p, group in zip(prompt_ids, completion_ids) for c in group]


def tree_tokens(prompt_ids: list, completion_ids: list) -> int:
    """Tokens of the prefix-tree batch of these groups (every shared prefix once), counted on the host."""
    return PrefixTreeLayout.packed_token_count(_sequences(prompt_ids, completion_ids))


def build_micro_batch(prompt_ids: list, completion_ids: list, *, grouped: bool, use_prefix_tree: bool,
                      padding_side: str, pad_token_id: int, device):
    """The micro-batch of these groups (see the module docstring).

    Args:
        prompt_ids: list of P 1-D LongTensors (CPU). completion_ids: per prompt, a list of 1-D
            LongTensors. grouped: prefix-grouped (or tree) batches, else repeated ones (the trainer's
            ``use_prefix_grouping``, off for a local-linear-attention policy: ``attention.py``).
            use_prefix_tree: a tree batch when the prompts share more than themselves.
            padding_side, pad_token_id: padding of the repeated batch. device: where the batch lives.

    Returns a ``RepeatedBatch``, ``TreeBatch`` or ``GroupedBatch``.
    """
    if not grouped:
        return pft.build_repeated_batch(prompt_ids, completion_ids, padding_side=padding_side,
                                        pad_token_id=pad_token_id, device=device)
    # Only prompts that share more than themselves make a tree: completions of unrelated prompts that
    # merely start alike ("<think>", "To ...") would otherwise move nearly every micro-batch off the
    # grouped kernels for a few tokens (the tree then shares those too).
    if use_prefix_tree and PrefixTreeLayout.packed_token_count(prompt_ids) < sum(p.numel() for p in prompt_ids):
        masks = [torch.cat([torch.zeros(p.numel(), dtype=torch.bool), torch.ones(c.numel(), dtype=torch.bool)])
                 for p, group in zip(prompt_ids, completion_ids) for c in group]
        return pft.build_tree_batch(_sequences(prompt_ids, completion_ids), masks, device=device)
    return pft.build_grouped_batch(prompt_ids, completion_ids, device=device)


def stored_tokens(batch) -> int:
    """Tokens ``batch`` runs through the model: the packed row of a grouped or tree batch, the
    unpadded tokens of a repeated one."""
    if isinstance(batch, pft.RepeatedBatch):
        return int(batch.attention_mask.sum())
    return batch.input_ids.numel()
