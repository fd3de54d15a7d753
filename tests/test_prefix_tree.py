"""PrefixTreeLayout and prefix_grouped_attention over it, against a float64 per-path reference
written here in plain Python/PyTorch: every root-to-leaf path run as its own causal sequence."""
import random

import pytest
import torch

from pyfastrl import PrefixGroupLayout, PrefixTreeLayout, prefix_grouped_attention
from pyfastrl._backend import BACKEND_ENV


# -- plain-Python trees and paths ------------------------------------------------------------------
def random_tree(rng: random.Random, max_depth: int, branching: int, max_len: int = 7):
    """(parents, lengths) in preorder: 1..3 roots, subtrees 1..max_depth deep, 0..branching children."""
    parents, lengths = [], []

    def grow(parent, depth):
        me = len(parents)
        parents.append(parent)
        lengths.append(rng.randint(1, max_len))
        if depth < max_depth:
            low = 1 if depth == 1 else 0  # every tree at least two levels deep when max_depth > 1
            for _ in range(rng.randint(low, branching)):
                grow(me, depth + 1)

    for _ in range(rng.randint(1, 3)):
        grow(-1, 1)
    return parents, lengths


def paths_of(parents, lengths):
    """Per leaf (segments no one names as parent, in order), the packed token indices of its path."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    leaves = [i for i in range(len(parents)) if i not in parents]
    paths = []
    for leaf in leaves:
        chain, s = [], leaf
        while s != -1:
            chain.insert(0, s)
            s = parents[s]
        paths.append([t for s in chain for t in range(starts[s], starts[s] + lengths[s])])
    return leaves, paths


def path_attention(q, k, v, scale, softcap=None, window=None):
    """Naive causal softmax attention of one sequence with GQA: q (L, Hq, D), k/v (L, Hkv, D)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q.shape[0])[:, None]
    j = torch.arange(q.shape[0])[None, :]
    hidden = j > i
    if window is not None:
        hidden = hidden | (i - j >= window)
    return torch.einsum("hij,jhd->ihd", torch.softmax(scores.masked_fill(hidden, float("-inf")), -1), v)


def per_path_reference(q, k, v, parents, lengths, grad_out, scale, softcap=None, window=None):
    """float64 output (each packed token from the first path through it; every path's copy must agree)
    and autograd's dq, dk, dv of ``sum(grad_out * out)``: shared tokens' gradients sum over paths."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = [None] * q.shape[0]
    for path in paths_of(parents, lengths)[1]:
        idx = torch.tensor(path)
        o = path_attention(q[idx], k[idx], v[idx], scale, softcap, window)
        for r, t in enumerate(path):
            if out[t] is None:
                out[t] = o[r]
            else:  # the same token on another path sees the same keys
                torch.testing.assert_close(o[r], out[t], atol=1e-12, rtol=0)
    out = torch.stack(out)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out.double()))


def op_and_grads(q, k, v, layout, grad_out, **kwargs):
    out = prefix_grouped_attention(q, k, v, layout, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def make_qkv(tokens, heads, kv_heads, dim, dtype=torch.float64):
    q = torch.randn(tokens, heads, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(tokens, kv_heads, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(tokens, kv_heads, dim, dtype=dtype, requires_grad=True)
    return q, k, v


def assert_all_close(got, want, atol, rtol=0.0):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -- the layout ----------------------------------------------------------------------------------
def test_small_tree_tables():
    #  0 (3) -> 1 (2) -> 2 (1), 3 (2);  0 -> 4 (4);  5 (2) a second root
    layout = PrefixTreeLayout([-1, 0, 1, 1, 0, -1], [3, 2, 1, 2, 4, 2])
    assert layout.num_segments == 6 and layout.total_tokens == 14
    assert layout.leaves == [2, 3, 4, 5] and layout.num_leaves == 4
    assert layout.segment_starts.tolist() == [0, 3, 5, 6, 8, 12]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 3, 4, 5, 6, 0, 1]
    assert layout.longest_sequence == 7 and layout.repeated_tokens == 6 + 7 + 7 + 2
    assert layout.repeated_cu_seqlens.tolist() == [0, 6, 13, 20, 22]
    assert isinstance(layout.parents, list) and isinstance(layout.lengths, list)
    assert layout.segment_table.device.type == "cpu"


@pytest.mark.parametrize("seed", range(40))
def test_random_tree_maps_follow_the_paths(seed):
    rng = random.Random(seed)
    parents, lengths = random_tree(rng, rng.randint(1, 5), rng.randint(1, 4))
    layout = PrefixTreeLayout(parents, lengths)
    leaves, paths = paths_of(parents, lengths)
    assert layout.leaves == leaves
    assert layout.total_tokens == sum(lengths)
    assert layout.repeated_index.tolist() == [t for p in paths for t in p]
    cu = [0]
    for p in paths:
        cu.append(cu[-1] + len(p))
    assert layout.repeated_cu_seqlens.tolist() == cu
    assert layout.longest_sequence == max(len(p) for p in paths)
    for p in paths:  # position_ids = position along the path
        assert layout.position_ids[torch.tensor(p)].tolist() == list(range(len(p)))
    # packed_to_repeated names a repeated row holding the token
    assert torch.equal(layout.repeated_index[layout.packed_to_repeated], torch.arange(layout.total_tokens))
    assert layout.attention_pairs <= layout.repeated_attention_pairs


def test_group_layout_is_a_two_level_tree():
    prefix_lens, suffix_lens = [5, 17, 1, 9], [[3, 9], [1, 20, 4], [6], [2, 2, 2, 2, 2]]
    parents, lengths = [], []
    for p, ss in zip(prefix_lens, suffix_lens):
        root = len(parents)
        parents += [-1] + [root] * len(ss)
        lengths += [p, *ss]
    group, tree = PrefixGroupLayout(prefix_lens, suffix_lens), PrefixTreeLayout(parents, lengths)
    for name in ("position_ids", "repeated_index", "repeated_cu_seqlens", "packed_to_repeated"):
        assert torch.equal(getattr(group, name), getattr(tree, name)), name
    assert (group.total_tokens, group.longest_sequence, group.repeated_tokens) == (
        tree.total_tokens, tree.longest_sequence, tree.repeated_tokens)
    assert (group.attention_pairs, group.repeated_attention_pairs) == (
        tree.attention_pairs, tree.repeated_attention_pairs)
    q, k, v = make_qkv(tree.total_tokens, 4, 2, 16)
    grad_out = torch.randn_like(q)
    assert_all_close(op_and_grads(q, k, v, tree, grad_out),
                     op_and_grads(q, k, v, group, grad_out, backend="torch"), atol=1e-12)


def test_to_device_and_repr():
    layout = PrefixTreeLayout(torch.tensor([-1, 0, 0]), torch.tensor([2, 1, 3]), device="cpu")
    assert layout.to("cpu") is layout
    assert "segments=3" in repr(layout) and "leaves=2" in repr(layout)


@pytest.mark.parametrize(
    "parents, lengths, message",
    [
        ([0], [1], r"parents\[0\] \(segment 0\) is 0"),
        ([-1, 1], [1, 1], r"parents\[1\] \(segment 1\) is 1"),
        ([-1, 2, 0], [1, 1, 1], r"parents\[1\] \(segment 1\) is 2"),
        ([-1, -2], [1, 1], r"parents\[1\] \(segment 1\) is -2"),
        ([-1, -1, 0], [3, 2, 1], r"parents\[2\] \(segment 2\) is 0.*preorder"),
        ([-1, 0, 1, 0, 2], [1, 1, 1, 1, 1], r"parents\[4\] \(segment 4\) is 2.*preorder"),
        ([-1, 0], [2, 0], r"lengths\[1\] \(segment 1\)"),
        ([-1, 0], [2, -3], r"lengths\[1\] \(segment 1\)"),
        ([-1, 0], [2, 1.0], r"lengths\[1\] \(segment 1\)"),
        ([-1, 0.0], [2, 1], r"parents\[1\] \(segment 1\)"),
        ([-1, True], [2, 1], r"parents\[1\] \(segment 1\)"),
        ([-1, 0], [2], "one entry per segment"),
        ([], [], "parents is empty"),
        (torch.zeros(2, 2, dtype=torch.long), [1, 1], "1-D"),
        ("ab", [1, 1], "parents must be a sequence"),
    ],
)
def test_bad_trees_raise_naming_the_segment(parents, lengths, message):
    with pytest.raises(ValueError, match=message):
        PrefixTreeLayout(parents, lengths)


# -- attention over random trees -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(24))
def test_random_trees_equal_per_path_reference(seed):
    rng = random.Random(seed)
    parents, lengths = random_tree(rng, max_depth=1 + seed % 5, branching=1 + (seed // 5) % 4)
    layout = PrefixTreeLayout(parents, lengths)
    gqa = [1, 2, 4][seed % 3]
    q, k, v = make_qkv(layout.total_tokens, 4, 4 // gqa, 8)
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, layout, grad_out)  # backend "auto" -> torch
    want = per_path_reference(q, k, v, parents, lengths, grad_out, 8 ** -0.5)
    assert_all_close(got, want, atol=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_softcap_and_sliding_window_follow_the_path(seed):
    rng = random.Random(100 + seed)
    parents, lengths = random_tree(rng, max_depth=4, branching=3)
    layout = PrefixTreeLayout(parents, lengths)
    q, k, v = make_qkv(layout.total_tokens, 4, 2, 8)
    grad_out = torch.randn_like(q)
    softcap = [None, 1.5][seed % 2]
    window = [None, 1, 3, 9][seed % 4]
    got = op_and_grads(q, k, v, layout, grad_out, softmax_scale=0.3, softcap=softcap, sliding_window=window,
                       backend="torch")
    want = per_path_reference(q, k, v, parents, lengths, grad_out, 0.3, softcap, window)
    assert_all_close(got, want, atol=1e-10)


def test_float32_and_bfloat16_inputs():
    parents, lengths = random_tree(random.Random(7), 3, 3)
    layout = PrefixTreeLayout(parents, lengths)
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        q, k, v = make_qkv(layout.total_tokens, 2, 1, 16, dtype)
        grad_out = torch.randn_like(q)
        got = op_and_grads(q, k, v, layout, grad_out)
        assert got[0].dtype == dtype
        assert_all_close(got, per_path_reference(q, k, v, parents, lengths, grad_out, 0.25), atol=atol, rtol=atol)


def test_tree_backends_and_bad_inputs(monkeypatch):
    layout = PrefixTreeLayout([-1, 0, 0], [3, 2, 2])
    q, k, v = make_qkv(7, 2, 2, 16, torch.float32)
    for backend in ("triton", "flash", "cuda"):
        with pytest.raises(ValueError, match="backend='torch'"):
            prefix_grouped_attention(q, k, v, layout, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_grouped_attention(q, k, v, layout, backend="bogus")
    monkeypatch.setenv(BACKEND_ENV, "triton")  # a global override leaves trees on torch
    torch.testing.assert_close(prefix_grouped_attention(q, k, v, layout),
                               prefix_grouped_attention(q, k, v, layout, backend="torch"))
    with pytest.raises(ValueError, match="total_tokens is 7"):
        prefix_grouped_attention(q[:6], k[:6], v[:6], layout)
    with pytest.raises(TypeError, match="PrefixTreeLayout"):
        prefix_grouped_attention(q, k, v, [3, 2, 2])


def test_custom_op_opcheck_and_compile():
    from pyfastrl.ops._prefix_tree_attention import _forward_op

    layout = PrefixTreeLayout([-1, 0, 1, 0], [3, 2, 2, 1])
    q, k, v = make_qkv(layout.total_tokens, 2, 1, 8)
    torch.library.opcheck(_forward_op, (q, k, v, layout.segment_table, layout.ancestor_index, 0.3, 0.0, 0))
    compiled = torch.compile(lambda q, k, v: prefix_grouped_attention(q, k, v, layout), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), prefix_grouped_attention(q, k, v, layout))


# -- from_sequences ----------------------------------------------------------------------------------
def trie_size(sequences):
    """Distinct non-empty prefixes: the tokens of the fully shared (trie) batch."""
    return len({tuple(s[:n]) for s in sequences for n in range(1, len(s) + 1)})


def check_from_sequences(sequences):
    layout, token_index = PrefixTreeLayout.from_sequences(sequences)
    assert layout.total_tokens == trie_size([s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in sequences])
    assert PrefixTreeLayout.packed_token_count(sequences) == layout.total_tokens  # counted without building it
    packed = [None] * layout.total_tokens
    ends = {s + n for s, n in zip(layout.segment_starts.tolist(), layout.lengths)}
    for seq, index in zip(sequences, token_index):
        seq = list(seq.tolist() if isinstance(seq, torch.Tensor) else seq)
        assert index.dtype == torch.long and index.shape == (len(seq),)
        assert layout.position_ids[index].tolist() == list(range(len(seq)))  # a path from a root
        assert index[-1].item() + 1 in ends  # every sequence ends at a segment end
        for t, token in zip(index.tolist(), seq):
            assert packed[t] in (None, token)
            packed[t] = token
    assert None not in packed
    # each sequence's tokens are the keys its last token sees: its own path, in order
    for seq, index in zip(sequences, token_index):
        end = index[-1].item()
        segment = max(i for i, s in enumerate(layout.segment_starts.tolist()) if s <= end)
        path = []
        while segment != -1:
            s, n = layout.segment_starts[segment].item(), layout.lengths[segment]
            path = list(range(s, min(s + n, end + 1))) + path
            segment = layout.parents[segment]
        assert index.tolist() == path
    return layout, token_index


@pytest.mark.parametrize("seed", range(30))
def test_from_sequences_random_with_planted_prefixes(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 50])  # tiny vocabularies share prefixes by chance too
    seqs = []
    bases = [[rng.randrange(vocab) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, 4))]
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if seqs and kind < 0.2:
            seqs.append(list(rng.choice(seqs)))  # identical
        elif seqs and kind < 0.35:
            s = rng.choice(seqs)
            seqs.append(s[:rng.randint(1, len(s))])  # a prefix of another
        else:
            base = list(rng.choice(bases + seqs)) if rng.random() < 0.8 else []
            base = base[:rng.randint(0, len(base))]
            seqs.append(base + [rng.randrange(vocab) for _ in range(rng.randint(0 if base else 1, 6))])
    if rng.random() < 0.5:
        seqs = [torch.tensor(s) for s in seqs]
    layout, _ = check_from_sequences(seqs)
    if seed % 5 == 0:  # the op over a built tree equals the per-path reference
        q, k, v = make_qkv(layout.total_tokens, 2, 1, 8)
        grad_out = torch.randn_like(q)
        assert_all_close(op_and_grads(q, k, v, layout, grad_out),
                         per_path_reference(q, k, v, layout.parents, layout.lengths, grad_out, 8 ** -0.5),
                         atol=1e-10)


def test_identical_and_prefix_sequences():
    layout, index = check_from_sequences([[1, 2, 3], [1, 2, 3], [1, 2], [1, 2, 3, 4], [9]])
    assert (layout.parents, layout.lengths) == ([-1, 0, 1, -1], [2, 1, 1, 1])
    assert [i.tolist() for i in index] == [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1, 2, 3], [4]]
    layout, index = check_from_sequences([[4, 4], [4, 4]])
    assert (layout.parents, layout.lengths) == ([-1], [2])
    assert torch.equal(index[0], index[1])


def test_first_seen_order():
    layout, index = check_from_sequences([[9, 1], [3, 3, 3], [9, 0], [3, 3, 2]])
    # roots in order of first appearance: [9] before [3, 3]; children likewise
    assert (layout.parents, layout.lengths) == ([-1, 0, 0, -1, 3, 3], [1, 1, 1, 2, 1, 1])
    assert [i.tolist() for i in index] == [[0, 1], [3, 4, 5], [0, 2], [3, 4, 6]]


def test_grpo_batch_gives_the_group_layout_token_count():
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(5, 30))] for _ in range(3)]
    seqs, prefix_lens, suffix_lens = [], [], []
    for prompt in prompts:
        completions = [[first] + [rng.randrange(1000) for _ in range(rng.randint(0, 20))] for first in range(4)]
        seqs += [prompt + c for c in completions]
        prefix_lens.append(len(prompt))
        suffix_lens.append([len(c) for c in completions])
    layout, _ = check_from_sequences(seqs)
    group = PrefixGroupLayout(prefix_lens, suffix_lens)
    assert layout.total_tokens == group.total_tokens
    assert layout.parents == [-1, 0, 0, 0, 0, -1, 5, 5, 5, 5, -1, 10, 10, 10, 10]
    assert layout.lengths == [n for p, ss in zip(prefix_lens, suffix_lens) for n in (p, *ss)]
    assert torch.equal(layout.position_ids, group.position_ids)


@pytest.mark.parametrize(
    "sequences, message",
    [
        ([], "sequences is empty"),
        ([[1, 2], []], r"sequences\[1\] is empty"),
        ([[1], torch.tensor([], dtype=torch.long)], r"sequences\[1\] is empty"),
        ([[1, 2], [1.5, 2]], r"sequences\[1\] must hold integer"),
        ([[True, False]], r"sequences\[0\] must hold integer"),
        ([[1], torch.tensor([1.0])], r"sequences\[1\] must hold integer"),
        ([[1], torch.ones(2, 2, dtype=torch.long)], r"sequences\[1\] must be a 1-D tensor"),
        ([[1], [[1, 2]]], r"sequences\[1\] must be a flat list"),
        ([[1], "abc"], r"sequences\[1\] must be a list"),
        ([[1], 7], r"sequences\[1\] must be a list"),
        (torch.ones(2, 3, dtype=torch.long), "sequences must be a list"),
    ],
)
def test_bad_sequences_raise_naming_the_sequence(sequences, message):
    with pytest.raises(ValueError, match=message):
        PrefixTreeLayout.from_sequences(sequences)


# -- a synthetic multi-turn batch: token counts ------------------------------------------------------
@pytest.mark.gpu
def test_cuda_tree_matches_cpu_without_host_syncs():
    parents, lengths = random_tree(random.Random(11), 4, 3, max_len=70)
    cpu = PrefixTreeLayout(parents, lengths)
    q, k, v = make_qkv(cpu.total_tokens, 8, 2, 64, torch.float32)
    grad_out = torch.randn_like(q)
    want = op_and_grads(q, k, v, cpu, grad_out, sliding_window=40)
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    grad_out_c = grad_out.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = PrefixTreeLayout(parents, lengths, device="cuda")
        got = op_and_grads(qc, kc, vc, layout, grad_out_c, sliding_window=40)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)
    _, index = PrefixTreeLayout.from_sequences([[1, 2, 3], [1, 2, 4]], device="cuda")
    assert index[1].device.type == "cuda" and index[1].tolist() == [0, 1, 3]
