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
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    grad_out = grad_out.float()
    options = dict(backend="triton", softcap=2.0, sliding_window=6)
    want = op_and_grads(q, k, v, group, grad_out, **options)
    assert_all_close(op_and_grads(q, k, v, tree, grad_out, **options), [t.double() for t in want], atol=1e-5,
                     rtol=1e-5)


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
    for backend in ("flash", "cuda"):
        with pytest.raises(ValueError, match="backend='triton' or backend='torch'"):
            prefix_grouped_attention(q, k, v, layout, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_grouped_attention(q, k, v, layout, backend="bogus")
    with pytest.raises(ValueError, match="total_tokens is 7"):
        prefix_grouped_attention(q[:6], k[:6], v[:6], layout)
    with pytest.raises(TypeError, match="PrefixTreeLayout"):
        prefix_grouped_attention(q, k, v, [3, 2, 2])
    with pytest.raises(TypeError, match="backend='torch'"):  # the Triton kernels' dtype check
        prefix_grouped_attention(q.double(), k.double(), v.double(), layout, backend="triton")
    with pytest.raises(ValueError, match="multiple of 16"):
        prefix_grouped_attention(q[..., :8], k[..., :8], v[..., :8], layout, backend="triton")


@pytest.mark.parametrize("env", [None, "triton", "torch", "flash", "cuda"])
def test_auto_picks_triton_for_trees_where_it_does_for_groups(monkeypatch, env):
    """Trees resolve as group layouts do where the flash backend does not apply (it refuses trees):
    with a sliding window. A global ``flash`` / ``cuda`` override leaves trees on auto."""
    from pyfastrl.kernels.prefix_attention import kernel
    from pyfastrl.ops.prefix_attention import _resolve, _resolve_tree

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    if env in ("triton", "torch"):
        monkeypatch.setenv(BACKEND_ENV, env)
    q = torch.randn(7, 2, 16)
    group_backend = _resolve("auto", q, None, 4)
    if env is not None:
        monkeypatch.setenv(BACKEND_ENV, env)
    assert _resolve_tree("auto", q) == group_backend
    # The op runs the backend it resolved to: the Triton tables are built for Triton only.
    built = []
    monkeypatch.setattr(kernel, "tree_tables", lambda *args, real=kernel.tree_tables: built.append(1) or real(*args))
    layout = PrefixTreeLayout([-1, 0, 0], [3, 2, 2])
    prefix_grouped_attention(q, q[:, :1], q[:, :1], layout)
    assert bool(built) == (group_backend == "triton")



def test_auto_sends_head_dims_the_triton_kernels_refuse_to_torch(monkeypatch):
    """Where auto picks Triton for trees (CUDA, or the override), a head dim its kernels refuse
    (not a multiple of 16) runs on torch instead of raising; asked for explicitly, it is an error."""
    from pyfastrl.ops.prefix_attention import _resolve_tree

    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert _resolve_tree("auto", torch.randn(7, 2, 16)) == "triton"
    assert _resolve_tree("auto", torch.randn(7, 2, 24)) == "torch"
    layout = PrefixTreeLayout([-1, 0, 0], [3, 2, 2])
    q, k, v = make_qkv(layout.total_tokens, 2, 1, 24, torch.float64)
    out = prefix_grouped_attention(q, k, v, layout)
    torch.testing.assert_close(out, prefix_grouped_attention(q, k, v, layout, backend="torch"))
    with pytest.raises(ValueError, match="multiple of 16"):
        prefix_grouped_attention(q.float(), k.float(), v.float(), layout, backend="triton")

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_opcheck_and_compile(backend):
    from pyfastrl.kernels.prefix_attention import kernel
    from pyfastrl.ops._prefix_tree_attention import _forward_op

    layout = PrefixTreeLayout([-1, 0, 1, 0], [3, 2, 2, 1])
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = make_qkv(layout.total_tokens, 2, 1, 16, dtype)
    tables = kernel.tree_tables(layout, q, k, 0.0, 2) if backend == "triton" else []
    torch.library.opcheck(_forward_op, (q, k, v, layout.segment_table, layout.ancestor_index, tables, 0.3, 0.0, 2,
                                        backend))

    def loss(q, k, v):
        return (prefix_grouped_attention(q, k, v, layout, sliding_window=2, backend=backend) ** 2).sum()

    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, torch.autograd.grad(loss(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b)


# -- the Triton backend ------------------------------------------------------------------------------
def visible_keys(parents, lengths, window=None):
    """Per packed query token, the set of packed keys it sees (its path, causally, in the window)."""
    seen = {}
    for path in paths_of(parents, lengths)[1]:
        for i, t in enumerate(path):
            seen[t] = {path[j] for j in range(i + 1) if window is None or i - j < window}
    return [seen[t] for t in range(sum(lengths))]


@pytest.mark.parametrize("seed", range(16))
def test_triton_tables_cover_exactly_the_visible_keys(seed):
    """The forward/dQ key tiles give each query row exactly its visible keys, once, with the mask
    the kernels apply (an unmasked tile is whole and seen by every row of its block), and ``shift``
    is the path-position offset; the dK/dV key blocks name exactly the queries that see a key."""
    from pyfastrl.tree_layout import MASKED_CAUSAL, UNMASKED

    rng = random.Random(200 + seed)
    parents, lengths = random_tree(rng, 1 + seed % 5, 1 + seed % 4, max_len=12)
    layout = PrefixTreeLayout(parents, lengths)
    block_m, block_n = [(1, 1), (4, 3), (16, 16), (5, 8)][seed % 4]
    window = [0, 1, 3, 8][(seed // 4) % 4]
    visible = visible_keys(parents, lengths, window or None)
    pos = layout.position_ids.tolist()
    rows, tiles = layout.query_tiles(block_m, block_n, window)
    covered = []
    for q_start, q_end, segment_start, first, end in rows.tolist():
        assert 0 < q_end - q_start <= block_m and len({pos[t] - t for t in range(segment_start, q_end)}) == 1
        for t in range(q_start, q_end):
            covered.append(t)
            seen = []
            for key_start, key_end, shift, mask in tiles[first:end].tolist():
                keys = range(key_start, min(key_start + block_n, key_end))
                assert all(pos[t] - pos[j] == t - j - shift for j in keys)
                shown = [j for j in keys if (mask != MASKED_CAUSAL or j <= t) and (not window or t - j - shift < window)]
                if mask == UNMASKED:
                    assert len(keys) == block_n and shown == list(keys)
                seen += shown
            assert sorted(seen) == sorted(visible[t])
    assert sorted(covered) == list(range(layout.total_tokens))

    seen_by = [[] for _ in range(layout.total_tokens)]
    for t, keys in enumerate(visible_keys(parents, lengths)):
        for key in keys:
            seen_by[key].append(t)
    keys = []
    for k_start, k_end, q_end in layout.key_blocks(block_n).tolist():
        assert 0 < k_end - k_start <= block_n
        for key in range(k_start, k_end):
            keys.append(key)
            assert seen_by[key] == list(range(key, q_end))
    assert sorted(keys) == list(range(layout.total_tokens))


@pytest.mark.parametrize("seed", range(10))
def test_triton_random_trees_equal_per_path_reference(seed):
    # Depth 1-5 and 1-4 children; segments up to 24 tokens, shorter and longer than the
    # interpreter's 16-row / 16-key tiles.
    rng = random.Random(300 + seed)
    parents, lengths = random_tree(rng, max_depth=1 + seed % 5, branching=1 + seed % 4, max_len=[7, 24][seed % 2])
    layout = PrefixTreeLayout(parents, lengths)
    softcap, window = [None, 1.5][(seed // 2) % 2], [None, 5, 1, 20][seed % 4]
    q, k, v = make_qkv(layout.total_tokens, 4, [4, 2, 1][seed % 3], 16, torch.float32)
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, layout, grad_out, softmax_scale=0.3, softcap=softcap, sliding_window=window,
                       backend="triton")
    want = per_path_reference(q, k, v, parents, lengths, grad_out, 0.3, softcap, window)
    assert_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("softcap, window", [(None, None), (2.0, 9)])
def test_triton_bfloat16_tree(softcap, window):
    parents, lengths = random_tree(random.Random(17), 4, 3, max_len=20)
    layout = PrefixTreeLayout(parents, lengths)
    q, k, v = make_qkv(layout.total_tokens, 4, 2, 32, torch.bfloat16)
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, layout, grad_out, softcap=softcap, sliding_window=window, backend="triton")
    assert got[0].dtype == torch.bfloat16
    # bf16: P and dS are rounded to bf16 before their matmuls (as in FlashAttention).
    assert_all_close(got, per_path_reference(q, k, v, parents, lengths, grad_out, 32 ** -0.5, softcap, window),
                     atol=3e-2, rtol=3e-2)


# Segments spanning >= 2 GPU tiles (query tiles of 64-128 rows, key tiles of 32-64), a first child
# contiguous with its parent's keys and later children that are not, a short segment, two roots.
GPU_TILE_TREE = ([-1, 0, 1, 1, 0, -1, 5], [150, 70, 40, 130, 3, 20, 90])


@pytest.mark.parametrize("target", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype, head_dim, softcap, window", [(torch.bfloat16, 64, None, None),
                                                              (torch.bfloat16, 128, None, None),
                                                              (torch.float32, 64, 30.0, 100)])
def test_triton_gpu_tile_tables_equal_per_path_reference(target, dtype, head_dim, softcap, window):
    from pyfastrl.kernels.launch_target import gpu_tiles

    layout = PrefixTreeLayout(*GPU_TILE_TREE)
    q, k, v = make_qkv(layout.total_tokens, 2, 1, head_dim, dtype)
    grad_out = torch.randn_like(q)
    scale = 3.0 * head_dim ** -0.5 if softcap else head_dim ** -0.5  # softcap: scores reach the cap
    with gpu_tiles(target):
        got = op_and_grads(q, k, v, layout, grad_out, softmax_scale=scale, softcap=softcap, sliding_window=window,
                           backend="triton")
    want = per_path_reference(q, k, v, *GPU_TILE_TREE, grad_out, scale, softcap, window)
    # bf16: P and dS are rounded to bf16 before their matmuls (as in FlashAttention); fp32: 3-pass TF32.
    atol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert_all_close(got, want, atol=atol, rtol=atol)


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
    """On CUDA "auto" runs trees on Triton (fp32 at D=64 has kernels on sm80 and sm90); the tables
    are built on the host and copied without a sync."""
    from pyfastrl.ops.prefix_attention import _resolve_tree

    assert _resolve_tree("auto", torch.empty(1, 8, 64, device="cuda")) == "triton"
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
