"""Prefix trees in transformers models: the trie-packed TreeBatch gives the log-probs and parameter
gradients of running every sequence on its own (tiny Llama and Qwen3), the one-level GRPO case gives
build_grouped_batch's log-probs, bad inputs are named, and `pyfastrl verify --tree` passes."""
import pytest
import torch

from pyfastrl import PrefixTreeLayout
from pyfastrl.cli import main
from pyfastrl.integrations import transformers as pft
from pyfastrl.integrations import transformers_tree as ptt

TREE_MODELS = ["tiny-llama", "tiny-qwen3"]


def _depth(layout: PrefixTreeLayout) -> int:
    """Segments on the longest root-to-leaf path."""
    depth = []
    for parent in layout.parents:
        depth.append(1 if parent == -1 else depth[parent] + 1)
    return max(depth)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", TREE_MODELS)
def test_tree_equals_per_sequence_batch(name, dtype):
    report = pft.verify_tree_equivalence(name, dtype=dtype, num_conversations=2, turns=3, samples_per_turn=2,
                                         prompt_len=10, turn_len=6, device="cpu",
                                         padding_side="left" if dtype == torch.float64 else "right",
                                         gradient_checkpointing=dtype == torch.float32)
    assert report.passed, report.summary()
    assert report.batch_kind == "tree" and "tree batch" in report.summary()
    assert len(report.grad_rel) == sum(1 for _ in pft.tiny_model(name).parameters())
    assert report.tokens_grouped < report.tokens_repeated / 2


def test_random_conversations_share_prefixes_at_several_depths():
    sequences, masks = ptt.random_tree_sequences(96, num_conversations=2, turns=3, samples_per_turn=2,
                                                 prompt_len=10, user_len=6, reply_len=6)
    assert len(sequences) == 2 * 2**3 + 2
    batch = ptt.build_tree_batch(sequences, masks)
    assert len([p for p in batch.layout.parents if p == -1]) == 2  # one tree per conversation
    # prompt + user message, then per turn a reply (+ the next user message); the first-reply
    # sequence ends inside the first trajectory and splits its turn-1 segment.
    assert _depth(batch.layout) == 5
    assert batch.completion_lens.tolist() == [int(sum(m)) for m in masks]


def _one_at_a_time(model, sequences, masks):
    """Log-probs of each sequence's masked tokens and the gradient of their sum, one sequence per
    forward with plain causal attention (no padding, no packing)."""
    model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    logprobs = []
    for ids, mask in zip(sequences, masks):
        ids, mask = torch.tensor(ids), torch.tensor(mask).bool()
        logits = model(ids[None], use_cache=False).logits[0, :-1].double()
        picked = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0][mask[1:]]
        logprobs.append(picked)
    sum(lp.sum() for lp in logprobs).backward()
    return logprobs, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", TREE_MODELS)
def test_tree_batch_equals_one_sequence_at_a_time(name):
    """Hand-made tree: a sequence that is a prefix of another, an identical pair (their shared
    tokens give one log-prob per sequence), masks over several separate replies and a sequence
    masking nothing."""
    model = pft.tiny_model(name, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 96, (n,), generator=g).tolist()

    system, user1, reply_a, reply_b, user2, reply_a2, reply_a3 = ids(7), ids(3), ids(4), ids(5), ids(2), ids(3), ids(6)
    sequences = [
        system + user1 + reply_a,                          # turn 1, sample a
        system + user1 + reply_a + user2 + reply_a2,       # turn 2 after a (the one above is its prefix)
        system + user1 + reply_b,                          # turn 1, sample b
        system + user1 + reply_a + user2 + reply_a3,       # another turn-2 sample after a
        system + user1 + reply_a + user2 + reply_a2,       # identical to sequence 1
        system + ids(4),                                   # a context masking nothing
    ]
    p, u, a = len(system), len(user1), len(reply_a)
    masks = [
        [0] * (p + u) + [1] * a,
        [0] * (p + u) + [1] * a + [0] * len(user2) + [1] * len(reply_a2),
        [0] * (p + u) + [1] * len(reply_b),
        [0] * (p + u + a + len(user2)) + [1] * len(reply_a3),  # only the last reply is trained
        [0] * (p + u) + [1] * a + [0] * len(user2) + [1] * len(reply_a2),
        [0] * (p + 4),
    ]
    batch = pft.build_tree_batch(sequences, masks)
    assert batch.input_ids.shape[1] == p + u + a + len(user2) + len(reply_a2) + len(reply_a3) + len(reply_b) + 4
    assert torch.equal(batch.token_index[1], batch.token_index[4])
    assert torch.equal(batch.token_index[0], batch.token_index[1][:p + u + a])
    for i, seq in enumerate(sequences):
        assert batch.input_ids[0, batch.token_index[i]].tolist() == seq

    model.zero_grad(set_to_none=True)
    logprobs, mask = pft.completion_logprobs(model, batch)
    logprobs[mask].sum().backward()
    grads = {n: prm.grad.clone() for n, prm in model.named_parameters()}
    reference, ref_grads = _one_at_a_time(model, sequences, masks)

    assert mask.sum(1).tolist() == [sum(m) for m in masks]
    assert mask.shape == (len(sequences), max(sum(m) for m in masks))
    for i, want in enumerate(reference):
        torch.testing.assert_close(logprobs[i, :want.numel()], want, atol=1e-9, rtol=0)
        assert not logprobs[i, want.numel():].any()
    for n, grad in ref_grads.items():
        torch.testing.assert_close(grads[n], grad, atol=1e-6 * grad.abs().max().item() + 1e-12, rtol=0)


def test_masked_token_is_predicted_at_its_predecessor_along_the_sequence():
    batch = pft.build_tree_batch([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 8, 4]],
                                 [[0, 0, 1, 1], [0, 0, 1], [0, 0, 0, 0, 1]])
    # packed: 5 6 | 7 8 | 4 | 9  (segments in first-seen order: [5,6], [7,8], [4], [9])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 4, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]
    assert batch.logit_index.tolist() == [1, 2, 1, 3]
    assert batch.target_ids.tolist() == [7, 8, 9, 4]
    assert batch.completion_lens.tolist() == [2, 1, 1]
    assert batch.max_completion_len == 2
    assert batch.output_index.tolist() == [0, 1, 2, 4]
    assert batch.token_id_range == (4, 9)


def test_grpo_case_equals_grouped_batch():
    """One level (G completions of each prompt): the tree batch gives build_grouped_batch's
    log-probs, mask and entropy, in the same (N, S_max) layout, and the same hidden states."""
    model = pft.tiny_model("tiny-qwen3", dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (9, 5)]
    completions = [[torch.randint(3, 96, (n,), generator=g) for n in sizes] for sizes in ([4, 1, 6], [3, 5])]
    # Two completions starting with the same token: the tree shares it, the grouped batch does not.
    completions[0][1] = torch.cat([completions[0][0][:1], completions[0][1]])
    sequences = [torch.cat([p, c]) for p, cs in zip(prompts, completions) for c in cs]
    masks = [[0] * p.numel() + [1] * c.numel() for p, cs in zip(prompts, completions) for c in cs]
    tree = pft.build_tree_batch(sequences, masks)
    grouped = pft.build_grouped_batch(prompts, completions)
    assert tree.input_ids.numel() == grouped.input_ids.numel() - 1
    with torch.no_grad():
        got = pft.completion_logprobs(model, tree, temperature=0.8, return_entropy=True)
        want = pft.completion_logprobs(model, grouped, temperature=0.8, return_entropy=True)
        hidden_tree = pft.completion_hidden_states(model, tree)
        hidden_grouped = pft.completion_hidden_states(model, grouped)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(got[2], want[2], atol=1e-10, rtol=0)
    torch.testing.assert_close(hidden_tree, hidden_grouped, atol=1e-10, rtol=0)


def test_sequence_batch_order_matches_tree_batch():
    sequences = [[5, 6, 7, 8], [5, 6, 9]]
    masks = [[0, 1, 0, 1], [0, 0, 1]]
    flat = pft.build_sequence_batch(sequences, masks, padding_side="left")
    assert flat.input_ids.tolist() == [[5, 6, 7, 8], [0, 5, 6, 9]]
    assert flat.logit_index.tolist() == [0, 2, 6]
    assert flat.target_ids.tolist() == [6, 8, 9]
    assert flat.completion_lens.tolist() == [2, 1]


@pytest.mark.parametrize("sequences, masks, match", [
    ([[1, 2, 3]], [[0, 1]], r"completion_masks\[0\] has 2 entries but sequences\[0\] has 3"),
    ([[1, 2], [1, 2, 3]], [[0, 1], [0, 1, 1, 0]], r"completion_masks\[1\] has 4 entries"),
    ([[1, 2, 3], [4, 5]], [[0, 0, 1], [1, 0]], r"completion_masks\[1\] marks the first token"),
    ([[1, 2, 3], []], [[0, 0, 1], []], r"sequences\[1\] is empty"),
    ([[1, 2, 3]], [[0, 2, 1]], r"completion_masks\[0\] must hold only 0/1"),
    ([[1, 2, 3]], [[0, 0.5, 1]], r"completion_masks\[0\] must hold only 0/1"),
    ([[1, 2, 3]], [torch.zeros(1, 3)], r"completion_masks\[0\] must be 1-D"),
    ([[1, 2, 3]], ["011"], r"completion_masks\[0\] must be a list"),
    ([[1, 2.5, 3]], [[0, 0, 1]], r"sequences\[0\] must hold integer token ids"),
    ([[1, 2, 3], [1, 2]], [[0, 0, 1]], r"one mask per sequence \(2 sequences\)"),
    ([[1, 2, 3]], [[0, 0, 0]], r"mark no token"),
    ([], [], r"sequences must be a non-empty list"),
])
def test_bad_input_names_the_index(sequences, masks, match):
    with pytest.raises(ValueError, match=match):
        pft.build_tree_batch(sequences, masks)


def test_model_checks():
    batch = pft.build_tree_batch([[5, 6, 7], [5, 6, 8]], [[0, 1, 1], [0, 0, 1]])
    model = pft.tiny_model("tiny-llama")
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="pyfastrl_prefix"):
        pft.completion_logprobs(model, batch)
    model.set_attn_implementation("pyfastrl_prefix")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        pft.completion_logprobs(model, pft.build_tree_batch([[5, 96]], [[0, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        pft.completion_logprobs(model, batch, temperature=0)
    logprobs, mask = pft.completion_logprobs(model, batch)
    assert logprobs.shape == mask.shape == (2, 2) and logprobs.dtype == torch.float32


def test_cli_verify_tree(capsys):
    code = main(["verify", "--tree", "--device", "cpu", "--turns", "2", "--prompt-len", "8",
                 "--completion-len", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 conversations, 2 turns, 2 sampled replies per turn" in out
    assert "PASS: tree and per-sequence batches" in out


def test_cli_turns_needs_tree(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--turns", "2"])
    assert exit_info.value.code == 2
    assert "--turns applies to --tree only" in capsys.readouterr().err


def test_tree_batch_on_the_triton_kernels_equals_per_sequence_batch(monkeypatch):
    """The model path with the tree attention on the Triton kernels (the interpreter here; what
    ``auto`` runs on CUDA): log-probs and every parameter gradient equal each sequence run alone."""
    from pyfastrl._backend import BACKEND_ENV
    from pyfastrl.kernels.prefix_attention import kernel

    monkeypatch.setenv(BACKEND_ENV, "triton")
    launched = []
    monkeypatch.setattr(kernel, "tree_tables", lambda *args, real=kernel.tree_tables: launched.append(1) or real(*args))
    report = pft.verify_tree_equivalence("tiny-llama", dtype=torch.float32, num_conversations=2, turns=2,
                                         samples_per_turn=2, prompt_len=6, turn_len=4, device="cpu")
    assert launched, "the tree attention did not run on the Triton backend"
    assert report.passed, report.summary()
