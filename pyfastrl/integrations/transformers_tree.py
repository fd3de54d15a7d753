"""Prefix trees in a transformers model: multi-turn sequences sharing prefixes at several depths,
packed once and run through the model in one forward.

    from pyfastrl.integrations import transformers as pft
    model = pft.tiny_model("tiny-llama")  # or from_pretrained(..., attn_implementation="pyfastrl_prefix")
    batch = pft.build_tree_batch(sequences, completion_masks)
    logprobs, mask = pft.completion_logprobs(model, batch)

Each sequence is a conversation's path (system prompt, earlier turns, this reply) as token ids, and
its completion mask marks the tokens whose log-probs are wanted (the assistant's replies). The
sequences are trie-compressed with ``PrefixTreeLayout.from_sequences`` (every common prefix packed
once) and the ``"pyfastrl_prefix"`` attention function runs ``prefix_grouped_attention`` on the
tree layout (Triton on CUDA, torch on CPU). The log-prob of token j of a sequence is read from the
logits at its token j-1, whose packed position is shared with every sequence through it: the
values and gradients equal running every sequence on its own (``verify_tree_equivalence``).

The names here are re-exported by ``pyfastrl.integrations.transformers``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pyfastrl.integrations import transformers as _pft
from pyfastrl.layout import _to_device
from pyfastrl.tree_layout import PrefixTreeLayout, _token_rows

__all__ = ["TreeBatch", "build_tree_batch", "build_sequence_batch", "tree_completion_logprobs",
           "verify_tree_equivalence", "random_tree_sequences"]


@dataclass
class TreeBatch:
    """Sequences sharing prefixes at several depths, packed once (see ``build_tree_batch``).

    N sequences, T packed tokens, K masked (completion) tokens over all sequences.

    Attributes:
        input_ids, position_ids: ``(1, T)`` int64; positions are along each token's path.
        layout: the ``PrefixTreeLayout`` of the packed batch.
        token_index: list of N ``(L_i,)`` int64 tensors: the packed index of every token of
            sequence i, in order (``input_ids[0, token_index[i]]`` is sequence i).
        logit_index: ``(K,)`` int64, sequence by sequence in token order: the packed index of the
            token before each masked token along its sequence (whose logits predict it).
        target_ids: ``(K,)`` int64, the masked tokens.
        completion_lens: ``(N,)`` int64, masked tokens per sequence (may be 0).
        output_index: ``(K,)`` int64 flat indices into ``(N, max_completion_len)``: where each
            masked token's log-prob goes in ``completion_logprobs``'s padded output.
        max_completion_len: host int, ``max(completion_lens)``.
        token_id_range: host ``(min, max)`` of the token ids (checked against the vocab without a
            device sync).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: PrefixTreeLayout
    token_index: list
    logit_index: torch.Tensor
    target_ids: torch.Tensor
    completion_lens: torch.Tensor
    output_index: torch.Tensor
    max_completion_len: int
    token_id_range: tuple

    @property
    def num_sequences(self) -> int:
        return len(self.token_index)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, _pft.LAYOUT_KWARG: self.layout}


def _validated_masks(sequences, completion_masks) -> tuple[list[tuple[int, ...]], list[torch.Tensor],
                                                           list[torch.Tensor]]:
    """Checked sequences (as tuples and CPU int64 tensors) and masks (CPU bool tensors)."""
    if isinstance(sequences, torch.Tensor) or isinstance(sequences, (str, bytes)) \
            or not isinstance(sequences, Sequence) or len(sequences) == 0:
        raise ValueError("sequences must be a non-empty list of token-id sequences (lists of ints or 1-D tensors)")
    rows, values = _token_rows(sequences)  # names the sequence on empty / non-integer / not 1-D
    if isinstance(completion_masks, torch.Tensor) or isinstance(completion_masks, (str, bytes)) \
            or not isinstance(completion_masks, Sequence) or len(completion_masks) != len(rows):
        got = len(completion_masks) if isinstance(completion_masks, Sequence) else type(completion_masks).__name__
        raise ValueError(f"completion_masks must be a list with one mask per sequence ({len(rows)} sequences), "
                         f"got {got}")
    masks = []
    for i, (row, mask) in enumerate(zip(rows, completion_masks)):
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 1:
                raise ValueError(f"completion_masks[{i}] must be 1-D, got shape {tuple(mask.shape)}")
            mask = mask.detach().cpu()
        elif isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
            raise ValueError(f"completion_masks[{i}] must be a list of 0/1 or a 1-D tensor, got {type(mask).__name__}")
        else:
            try:
                mask = torch.tensor(mask) if len(mask) else torch.zeros(0, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"completion_masks[{i}] must be a flat list of 0/1") from None
            if mask.dim() != 1:
                raise ValueError(f"completion_masks[{i}] must be a flat list of 0/1, got nested lists")
        if mask.numel() != len(row):
            raise ValueError(f"completion_masks[{i}] has {mask.numel()} entries but sequences[{i}] has "
                             f"{len(row)} tokens: one mask entry per token")
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"completion_masks[{i}] must hold only 0/1 (or booleans)")
        mask = mask.bool()
        if bool(mask[0]):
            raise ValueError(f"completion_masks[{i}] marks the first token of sequences[{i}]: no earlier "
                             "token predicts it, so it has no log-prob; mask it out")
        masks.append(mask)
    if not any(bool(m.any()) for m in masks):
        raise ValueError("completion_masks mark no token in any sequence: nothing to compute log-probs of")
    return rows, values, masks


def build_tree_batch(sequences, completion_masks, *, device=None) -> TreeBatch:
    """Pack token-id sequences that share prefixes at several depths into one trie-compressed row.

    Args:
        sequences: non-empty list of N non-empty token-id sequences (lists of ints or 1-D integer
            tensors), each a full path: prompt, earlier turns, this completion.
        completion_masks: list of N masks, ``len(completion_masks[i]) == len(sequences[i])``, 0/1
            or bool (lists or 1-D tensors): 1 where the token is a completion token of this
            sequence whose log-prob is wanted. The first token cannot be marked (nothing predicts
            it). A sequence may mark none, but the batch must mark at least one token.
        device: where the batch lives (default: the first sequence's device if it is a tensor,
            else the CPU).

    Returns:
        a ``TreeBatch``. Identical sequences, or a sequence that is a prefix of another, share
        their packed tokens; a token marked in several sequences gets one log-prob per sequence.

    Raises ValueError naming the index for a mask whose length differs from its sequence's, a mask
    on a first token, a mask entry other than 0/1, an empty sequence or non-integer tokens.
    Built on the host with a few host-to-device copies; nothing is read back from the device.
    """
    rows, values, masks = _validated_masks(sequences, completion_masks)
    if device is None:
        first = sequences[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    layout, token_index = PrefixTreeLayout.from_sequences(values, device=device)

    # Flat (over all sequences' tokens) positions of the masked tokens: their predecessors are the
    # flat positions one before (never crossing a sequence start: a first token is never masked).
    flat_mask = torch.cat(masks)
    positions = flat_mask.nonzero()[:, 0]
    counts = torch.tensor([int(m.sum()) for m in masks], dtype=torch.long)
    width = int(counts.max())
    row_of = torch.repeat_interleave(torch.arange(len(rows)), counts)
    column = torch.arange(positions.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    tokens = torch.cat(values)

    # Token ids by packed position: every sequence's tokens written to their packed slots (shared
    # slots receive the same id from each sequence through them).
    flat_packed = torch.cat(token_index)
    host = torch.cat([positions - 1, tokens[positions], counts, row_of * width + column, tokens])
    k = positions.numel()
    predecessor, target_ids, completion_lens, output_index, tokens_dev = _to_device(host, device).split(
        [k, k, len(rows), k, tokens.numel()])
    input_ids = torch.empty(layout.total_tokens, dtype=torch.long, device=device).index_copy_(
        0, flat_packed, tokens_dev)
    return TreeBatch(
        input_ids=input_ids[None], position_ids=layout.position_ids[None], layout=layout, token_index=token_index,
        logit_index=flat_packed.index_select(0, predecessor), target_ids=target_ids,
        completion_lens=completion_lens, output_index=output_index, max_completion_len=width,
        token_id_range=(int(tokens.min()), int(tokens.max())),
    )


def build_sequence_batch(sequences, completion_masks, *, padding_side="right", pad_token_id=0,
                         device=None) -> "_pft.RepeatedBatch":
    """The comparison batch of ``build_tree_batch``: one padded row per sequence (no sharing), as a
    ``RepeatedBatch`` whose ``completion_logprobs`` come out in the same ``(N, max_completion_len)``
    order as the tree batch's.

    Args: as ``build_tree_batch``; padding_side "left" or "right", padded with ``pad_token_id``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows, values, masks = _validated_masks(sequences, completion_masks)
    if device is None:
        first = sequences[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    logit_index, targets = [], []
    for r, (ids, mask) in enumerate(zip(values, masks)):
        start = width - ids.numel() if padding_side == "left" else 0
        input_ids[r, start:start + ids.numel()] = ids
        attention_mask[r, start:start + ids.numel()] = 1
        where = mask.nonzero()[:, 0]
        logit_index.append(r * width + start + where - 1)
        targets.append(ids[where])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return _pft.RepeatedBatch(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
        logit_index=torch.cat(logit_index).to(device), target_ids=torch.cat(targets).to(device),
        completion_lens=torch.tensor([int(m.sum()) for m in masks], device=device),
    )


def _check_model(model, batch: TreeBatch) -> None:
    config = model.config
    if config._attn_implementation != _pft.ATTN_IMPLEMENTATION:
        raise ValueError(
            f"a tree batch needs the model's attention set to {_pft.ATTN_IMPLEMENTATION!r} "
            f"(it is {config._attn_implementation!r}): call register() and "
            f"model.set_attn_implementation({_pft.ATTN_IMPLEMENTATION!r})"
        )
    _pft._check_model_type(config)
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    low, high = batch.token_id_range
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocab); got [{low}, {high}]")


def tree_completion_logprobs(model, batch: TreeBatch, *, temperature: float = 1.0, return_entropy: bool = False):
    """``completion_logprobs`` for a ``TreeBatch``: one forward over the packed tree.

    Returns:
        logprobs ``(N, max_completion_len)`` (zero where masked), mask ``(N, max_completion_len)``
        bool, and with ``return_entropy`` the per-token entropy of the same shape: row i holds
        sequence i's masked tokens in token order (row i of ``completion_lens[i]`` valid entries).
        Float32 (float64 for a float64 model). No host-device synchronisation.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(batch, TreeBatch):
        raise TypeError(f"batch must be a TreeBatch, got {type(batch).__name__}")
    _check_model(model, batch)
    logits = model(**batch.model_inputs(), logits_to_keep=batch.logit_index, use_cache=False).logits[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    token_logprobs = log_probs.gather(-1, batch.target_ids[:, None])[:, 0]

    shape = (batch.num_sequences, batch.max_completion_len)
    lens = batch.completion_lens
    mask = torch.arange(shape[1], device=lens.device)[None, :] < lens[:, None]

    def padded(values):
        return values.new_zeros(shape[0] * shape[1]).index_copy(0, batch.output_index, values).view(shape)

    if not return_entropy:
        return padded(token_logprobs), mask
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return padded(token_logprobs), mask, padded(entropy)


def tree_hidden_states(model, batch: TreeBatch) -> torch.Tensor:
    """``completion_hidden_states`` for a ``TreeBatch``: final hidden states ``(K, H)`` at the
    positions predicting the masked tokens, in ``batch.target_ids`` order."""
    _check_model(model, batch)
    hidden = model.base_model(**batch.model_inputs(), use_cache=False).last_hidden_state[0]
    return hidden.index_select(0, batch.logit_index)


# ---------------------------------------------------------------------------------------------------
# Equivalence check
# ---------------------------------------------------------------------------------------------------
def random_tree_sequences(vocab: int, *, num_conversations: int = 2, turns: int = 3, samples_per_turn: int = 2,
                          prompt_len: int = 32, user_len: int = 12, reply_len: int = 16,
                          generator: torch.Generator | None = None):
    """Random multi-turn conversations as token-id sequences sharing prefixes at several depths.

    Each conversation starts with a system prompt; at every turn a user message follows, then
    ``samples_per_turn`` sampled replies, each continued by its own next user message. Returns
    ``(sequences, completion_masks)`` with one sequence per trajectory (root-to-leaf path,
    ``num_conversations * samples_per_turn ** turns`` of them) masking every reply token, plus, per
    conversation, its first turn's first reply alone (a strict prefix of longer sequences, masking
    that reply only). Lengths are drawn from [len/2, len]; ids from [3, vocab).
    """
    generator = generator or torch.Generator().manual_seed(0)

    def ids(longest):
        n = int(torch.randint(max(1, longest // 2), longest + 1, (1,), generator=generator))
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    sequences, masks = [], []
    for _ in range(num_conversations):
        prompt = ids(prompt_len)
        paths = [(prompt, [0] * len(prompt))]  # (tokens, mask) per open trajectory
        for turn in range(turns):
            grown = []
            for tokens, mask in paths:
                user = ids(user_len)
                for _ in range(samples_per_turn):
                    reply = ids(reply_len)
                    grown.append((tokens + user + reply, mask + [0] * len(user) + [1] * len(reply)))
            if turn == 0:
                first_tokens, first_mask = grown[0]
            paths = grown
        for tokens, mask in paths:
            sequences.append(tokens)
            masks.append(mask)
        sequences.append(first_tokens)
        masks.append(first_mask)
    return sequences, masks


def verify_tree_equivalence(model="tiny-llama", *, num_conversations: int = 2, turns: int = 3,
                            samples_per_turn: int = 2, prompt_len: int = 32, turn_len: int = 16,
                            dtype=torch.float32, device=None, seed: int = 0, padding_side: str = "left",
                            gradient_checkpointing: bool = False,
                            tolerance: float | None = None) -> "_pft.EquivalenceReport":
    """The tree counterpart of ``verify_equivalence``: random multi-turn conversations
    (``random_tree_sequences``; user messages and replies up to ``turn_len`` tokens) run as one
    padded row per sequence (transformers' SDPA, or eager for soft-capped models) and as the
    trie-compressed ``TreeBatch`` (``"pyfastrl_prefix"``), forward and backward through a GRPO-like
    loss; compares the log-probs of every masked token and every parameter gradient.

    Args: as ``verify_equivalence`` (``model``: a built-in tiny config name, a local directory or a
    loaded model); ``num_conversations``, ``turns``, ``samples_per_turn`` shape the trees.

    Returns:
        an ``EquivalenceReport`` (``batch_kind="tree"``): tokens_repeated counts the padded
        per-sequence batch, tokens_grouped the packed tree.
    """
    if min(num_conversations, turns, samples_per_turn, prompt_len, turn_len) < 1:
        raise ValueError("num_conversations, turns, samples_per_turn, prompt_len and turn_len must be >= 1")

    def batches(vocab, generator, pad_token_id, device):
        sequences, masks = random_tree_sequences(
            vocab, num_conversations=num_conversations, turns=turns, samples_per_turn=samples_per_turn,
            prompt_len=prompt_len, user_len=turn_len, reply_len=turn_len, generator=generator)
        reference = build_sequence_batch(sequences, masks, padding_side=padding_side, pad_token_id=pad_token_id,
                                         device=device)
        return reference, build_tree_batch(sequences, masks, device=device)

    return _pft._compare_batches(model, batches, batch_kind="tree", dtype=dtype, device=device, seed=seed,
                                 gradient_checkpointing=gradient_checkpointing, tolerance=tolerance)
