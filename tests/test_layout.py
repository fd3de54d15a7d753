import importlib
import pathlib
import random
import sys

import pytest
import torch

from pyfastrl import PrefixGroupLayout

RAGGED = ([5, 17, 1, 9], [[3, 9], [1, 20, 4], [6], [2, 2, 2, 2, 2]])
TENSORS = ("position_ids", "prefix_starts", "suffix_starts", "member_group", "repeated_index",
           "repeated_cu_seqlens", "packed_to_repeated")


def python_loop_layout():
    """The loop-per-token implementation the layout had before tensor ops (the layout benchmark's
    baseline, benchmarks/layout.py): the reference every table must equal exactly."""
    benchmarks = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    return importlib.import_module("layout").PythonLoopLayout


def random_layouts(count: int, seed: int = 0):
    """Ragged layouts: 1..6 groups, groups of one member, 1-token prompts and completions, long ones."""
    rng = random.Random(seed)

    def length():
        return rng.choice([1, 1, 2, rng.randint(1, 9), rng.randint(1, 70), rng.randint(100, 300)])

    for _ in range(count):
        groups = rng.randint(1, 6)
        yield ([length() for _ in range(groups)],
               [[length() for _ in range(rng.choice([1, 1, 2, rng.randint(1, 9)]))] for _ in range(groups)])


def allowed_pairs(layout: PrefixGroupLayout) -> torch.Tensor:
    """Dense (T, T) mask written straight from the spec's attention rule (tests only)."""
    group, member = [], []
    for g, (p, ss) in enumerate(zip(layout.prefix_lens, layout.suffix_lens)):
        group += [g] * p
        member += [-1] * p
        for i, s in enumerate(ss):
            group += [g] * s
            member += [i] * s
    group, member = torch.tensor(group), torch.tensor(member)
    pos = torch.arange(layout.total_tokens)
    same_group = group[:, None] == group[None, :]
    key_in_prefix = member[None, :] == -1
    same_member = member[:, None] == member[None, :]
    return same_group & (key_in_prefix | same_member) & (pos[None, :] <= pos[:, None])


def test_sizes_and_position_ids():
    layout = PrefixGroupLayout([3, 2], [[2, 1], [4]])
    assert layout.total_tokens == 3 + 2 + 1 + 2 + 4
    assert layout.num_groups == 2 and layout.num_members == 3 and layout.group_sizes == (2, 1)
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 5]
    assert layout.prefix_starts.tolist() == [0, 6]
    assert layout.suffix_starts.tolist() == [3, 5, 8]
    assert layout.member_group.tolist() == [0, 0, 1]
    assert layout.repeated_tokens == (3 + 2) + (3 + 1) + (2 + 4)
    assert layout.longest_sequence == 2 + 4


def test_index_maps_rebuild_the_repeated_layout():
    layout = PrefixGroupLayout(*RAGGED)
    rep, cu = layout.repeated_index, layout.repeated_cu_seqlens.tolist()
    assert rep.numel() == layout.repeated_tokens == cu[-1]
    # Each member sequence is [prefix ; own suffix] with positions 0..P+S-1, as in the repeated batch.
    members = [(g, s) for g, ss in enumerate(layout.suffix_lens) for s in ss]
    for m, (g, s) in enumerate(members):
        seq = rep[cu[m] : cu[m + 1]]
        p0, p = layout.prefix_starts[g].item(), layout.prefix_lens[g]
        s0 = layout.suffix_starts[m].item()
        assert seq.tolist() == list(range(p0, p0 + p)) + list(range(s0, s0 + s))
        assert layout.position_ids[seq].tolist() == list(range(p + s))
    # Collapsing takes every packed token from a copy of itself.
    assert torch.equal(rep[layout.packed_to_repeated], torch.arange(layout.total_tokens))


@pytest.mark.parametrize("block", [None, 1, 4, 16])
def test_query_blocks_cover_exactly_the_attention_rule(block):
    layout = PrefixGroupLayout(*RAGGED)
    table = layout.query_blocks(block)
    implied = torch.zeros(layout.total_tokens, layout.total_tokens, dtype=torch.bool)
    seen = torch.zeros(layout.total_tokens, dtype=torch.long)
    for q0, q1, c0, f0, f1 in table.tolist():
        assert q1 > q0 and (block is None or q1 - q0 <= block)
        for q in range(q0, q1):
            seen[q] += 1
            implied[q, f0:f1] = True
            implied[q, c0 : q + 1] = True
    assert torch.all(seen == 1)
    assert torch.equal(implied, allowed_pairs(layout))


@pytest.mark.parametrize("block", [1, 4, 16])
def test_key_blocks_cover_exactly_the_attention_rule(block):
    layout = PrefixGroupLayout(*RAGGED)
    implied = torch.zeros(layout.total_tokens, layout.total_tokens, dtype=torch.bool)
    seen = torch.zeros(layout.total_tokens, dtype=torch.long)
    for k0, k1, q_end in layout.key_blocks(block).tolist():
        assert 0 < k1 - k0 <= block
        for key in range(k0, k1):
            seen[key] += 1
            implied[key:q_end, key] = True
    assert torch.all(seen == 1)
    assert torch.equal(implied, allowed_pairs(layout))


def test_block_tables_are_cached_and_ordered_heaviest_first():
    layout = PrefixGroupLayout(*RAGGED)
    assert layout.query_blocks(16) is layout.query_blocks(16)
    assert layout.key_blocks(4) is layout.key_blocks(4)
    work = [(f1 - f0) + (q1 - c0) for q0, q1, c0, f0, f1 in layout.query_blocks(4).tolist()]
    assert work == sorted(work, reverse=True)
    assert layout.query_blocks(4).dtype == torch.int32


def test_pair_counts_match_dense_rule_and_spec_example():
    layout = PrefixGroupLayout(*RAGGED)
    assert layout.attention_pairs == int(allowed_pairs(layout).sum())
    big = PrefixGroupLayout([4096], [[512] * 16])
    assert (big.repeated_tokens, big.total_tokens) == (73_728, 12_288)
    assert round(big.repeated_attention_pairs / 1e8, 2) == 1.70
    assert round(big.attention_pairs / 1e7, 2) == 4.40


def test_to_device():
    layout = PrefixGroupLayout([2], [[1]])
    assert layout.to("cpu") is layout
    moved = layout.to("meta")
    assert moved.device.type == "meta" and moved.position_ids.device.type == "meta"


@pytest.mark.parametrize(
    "prefix_lens, suffix_lens, match",
    [
        ([], [], "no groups"),
        ([3, 2], [[1]], "one list of suffix lengths per group"),
        ([3, 2], [[1], []], r"suffix_lens\[1\] \(group 1\) must list at least one member"),
        ([3, 0], [[1], [2]], r"prefix_lens\[1\] \(group 1\) must be an integer >= 1, got 0"),
        ([3, 2], [[1], [2, 5, -1]], r"group 1, member 2\) must be an integer >= 1, got -1"),
        ([3, 2.0], [[1], [2]], r"prefix_lens\[1\] \(group 1\)"),
        ([3, 2], [[1.5], [2]], r"group 0, member 0"),
        ([3, 2], [[True], [2]], r"group 0, member 0"),
        ([3, "2"], [[1], [2]], r"prefix_lens\[1\]"),
    ],
)
def test_invalid_layouts_name_the_group_and_member(prefix_lens, suffix_lens, match):
    with pytest.raises(ValueError, match=match):
        PrefixGroupLayout(prefix_lens, suffix_lens)


def test_accepts_tensors_and_numpy_integers():
    import numpy as np

    layout = PrefixGroupLayout(torch.tensor([3, 2]), [torch.tensor([1, 2]), [np.int64(4)]])
    assert layout.total_tokens == 3 + 1 + 2 + 2 + 4


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device, what
    assert torch.equal(got, want), what


def test_tables_equal_the_python_loop_reference_on_random_ragged_layouts():
    reference_class = python_loop_layout()
    for prefix_lens, suffix_lens in [RAGGED, ([1], [[1]]), ([3], [[1]]), ([1], [[1] * 7])] + list(random_layouts(150)):
        what = f"{prefix_lens} {suffix_lens}"
        layout, reference = PrefixGroupLayout(prefix_lens, suffix_lens), reference_class(prefix_lens, suffix_lens)
        assert (layout.total_tokens, layout.longest_sequence) == (reference.total_tokens, reference.longest_sequence)
        assert layout.repeated_tokens == reference.repeated_index.numel()
        for name in TENSORS:
            assert_same(getattr(layout, name), getattr(reference, name), f"{name} of {what}")
        for block in (None, 1, 2, 3, 16, 64, 128):
            assert_same(layout.query_blocks(block), reference.query_blocks(block), f"query_blocks({block}) of {what}")
        for block in (1, 2, 3, 16, 64, 128):
            assert_same(layout.key_blocks(block), reference.key_blocks(block), f"key_blocks({block}) of {what}")


@pytest.mark.parametrize("block", [0, -4, 2.0, True])
def test_block_sizes_must_be_positive_integers(block):
    layout = PrefixGroupLayout(*RAGGED)
    with pytest.raises(ValueError, match="block size must be an integer >= 1"):
        layout.query_blocks(block)
    with pytest.raises(ValueError, match="block size must be an integer >= 1"):
        layout.key_blocks(block)


@pytest.mark.gpu
def test_built_on_the_gpu_without_reading_back_and_equal_to_the_reference():
    prefix_lens, suffix_lens = [300, 7, 1], [[5, 90, 1], [2], [64, 64]]
    layout = PrefixGroupLayout(prefix_lens, suffix_lens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = layout.to("cuda")
        tables = on_gpu.query_blocks(128), on_gpu.key_blocks(64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in TENSORS:
        assert_same(getattr(on_gpu, name).cpu(), getattr(layout, name), name)
    assert_same(tables[0].cpu(), layout.query_blocks(128), "query_blocks")
    assert_same(tables[1].cpu(), layout.key_blocks(64), "key_blocks")
