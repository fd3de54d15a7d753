"""The packed shared-prefix layout: B groups, each a prefix followed by its members' suffixes.

See ``shared/specs/prefix-grouped-attention.md``. Tokens are packed with no padding::

    [ prefix_0 | suffix_0,0 | ... | suffix_0,G0-1 | prefix_1 | suffix_1,0 | ... ]

A layout is built once per batch and passed to every attention layer; the block schedules the
kernels iterate over are computed from it once and cached on it. Both are tensor arithmetic on the
layout's device over the per-group and per-member lengths (no Python loop over tokens or members).
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

# Number of int32 columns in a query-block row and a key-block row (see ``query_blocks`` / ``key_blocks``).
QUERY_BLOCK_COLUMNS = 5
KEY_BLOCK_COLUMNS = 3


def _as_length(value, where: str) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{where} must be an integer >= 1, got {value!r}")
    try:
        length = operator.index(value)
    except TypeError:
        raise ValueError(f"{where} must be an integer >= 1, got {value!r}") from None
    if length < 1:
        raise ValueError(f"{where} must be an integer >= 1, got {length}")
    return length


def _validated(prefix_lens, suffix_lens) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    if isinstance(prefix_lens, torch.Tensor):
        prefix_lens = prefix_lens.tolist()
    if not isinstance(prefix_lens, Sequence) or len(prefix_lens) == 0:
        raise ValueError("prefix_lens must be a non-empty sequence of prefix lengths (one per group); got no groups")
    if not isinstance(suffix_lens, Sequence) or len(suffix_lens) != len(prefix_lens):
        got = len(suffix_lens) if isinstance(suffix_lens, Sequence) else type(suffix_lens).__name__
        raise ValueError(
            f"suffix_lens must hold one list of suffix lengths per group: {len(prefix_lens)} groups "
            f"in prefix_lens, got {got}"
        )
    prefixes = tuple(_as_length(p, f"prefix_lens[{g}] (group {g})") for g, p in enumerate(prefix_lens))
    suffixes = []
    for g, members in enumerate(suffix_lens):
        if isinstance(members, torch.Tensor):
            members = members.tolist()
        if not isinstance(members, Sequence) or len(members) == 0:
            raise ValueError(f"suffix_lens[{g}] (group {g}) must list at least one member's suffix length")
        suffixes.append(
            tuple(_as_length(s, f"suffix_lens[{g}][{i}] (group {g}, member {i})") for i, s in enumerate(members))
        )
    return prefixes, tuple(suffixes)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to CUDA through pinned memory, so the host does not wait."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


def _ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])``, lengths >= 1 summing to ``total``:
    steps of 1, and at each range's first element the jump from the previous range's last."""
    steps = torch.ones(total, dtype=torch.long, device=lengths.device)
    last = torch.nn.functional.pad(starts + lengths - 1, (1, 0), value=0)[:-1]
    steps[_exclusive_cumsum(lengths)] = starts - last
    return torch.cumsum(steps, 0)


def _range_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``repeat_interleave(arange(len(lengths)), lengths)``, lengths >= 1 summing to ``total``."""
    starts = torch.zeros(total, dtype=torch.long, device=lengths.device)
    # index_fill_ rather than `starts[index] = 1`, which copies the 1 from the host: a sync on CUDA.
    starts.index_fill_(0, _exclusive_cumsum(lengths)[1:], 1)
    return torch.cumsum(starts, 0)


def _heaviest_first(rows: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """``rows`` as int32, most ``work`` first (ties keep their order)."""
    return rows[torch.argsort(-work, stable=True)].to(torch.int32).contiguous()


class PrefixGroupLayout:
    """Where each group's prefix and each member's suffix sit in a packed batch.

    Args:
        prefix_lens: ``[P_0, P_1, ...]``, one prefix (prompt) length >= 1 per group.
        suffix_lens: ``[[S_00, S_01, ...], [S_10, ...], ...]``, the suffix (completion) lengths >= 1
            of each group's members; groups may have different sizes.
        device: where the index tensors live; must be the device of the attention inputs.

    Attributes:
        total_tokens: T, tokens in the packed batch.
        longest_sequence: the longest ``P_g + S_gi``, i.e. the longest repeated-layout sequence.

    Attributes (tensors on ``device``):
        position_ids: ``(T,)`` int64. Prefix tokens ``0..P_g-1``; suffix ``(g, i)`` tokens
            ``P_g..P_g+S_gi-1``, so every token gets the rotary phase it has in the repeated layout.
        prefix_starts: ``(B,)`` int64, packed index of each group's first prefix token.
        suffix_starts: ``(M,)`` int64, packed index of each member's first suffix token
            (members numbered group by group, M = ``num_members``).
        member_group: ``(M,)`` int64, the group of each member.
        repeated_index: ``(R,)`` int64. The repeated-prefix layout concatenates, member by member,
            ``[prefix_g ; suffix_gi]``; row r of it is packed row ``repeated_index[r]``.
        repeated_cu_seqlens: ``(M + 1,)`` int64 offsets of the members' sequences in that layout.
        packed_to_repeated: ``(T,)`` int64. The repeated-layout row whose value a packed token takes
            when collapsing back (prefix tokens: their copy in the group's first member).
    """

    def __init__(self, prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]], *, device=None):
        self.prefix_lens, self.suffix_lens = _validated(prefix_lens, suffix_lens)
        self.device = torch.device("cpu" if device is None else device)
        # Everything below is tensor arithmetic on `device`: the B + M lengths go there once, and
        # every token-level array is a cumulative sum whose size the host knows from the lengths, so
        # no Python loop runs over tokens or members and nothing is read back from the device.
        as_long = dict(dtype=torch.long, device=self.device)
        groups, members = self.num_groups, self.num_members
        lengths = torch.tensor([*self.prefix_lens, *(s for ss in self.suffix_lens for s in ss), *self.group_sizes],
                               dtype=torch.long)
        prefix, suffix, sizes = _to_device(lengths, self.device).split([groups, members, groups])
        member_group = _range_ids(sizes, members)
        first_member = _exclusive_cumsum(sizes)  # (B,) index of each group's first member

        # Segments in packed order: each group's prefix, then its members' suffixes.
        prefix_segment = torch.arange(groups, **as_long) + first_member
        member_segment = member_group + torch.arange(members, **as_long) + 1
        segment_lens = torch.empty(groups + members, **as_long)
        segment_lens[prefix_segment] = prefix
        segment_lens[member_segment] = suffix
        segment_starts = _exclusive_cumsum(segment_lens)
        prefix_starts = segment_starts[prefix_segment]
        suffix_starts = segment_starts[member_segment]
        self.total_tokens = sum(self.prefix_lens) + sum(sum(s) for s in self.suffix_lens)
        # Longest P_g + S_gi (a repeated-layout sequence); read by every layer's sliding-window check.
        self.longest_sequence = max(p + max(ss) for p, ss in zip(self.prefix_lens, self.suffix_lens))

        # The repeated layout, member by member [prefix_g ; suffix_gi]: 2M pieces.
        member_prefix = prefix[member_group]
        repeated_cu = torch.nn.functional.pad(torch.cumsum(member_prefix + suffix, 0), (1, 0))
        pieces = torch.stack([member_prefix, suffix], 1).flatten()
        piece_sources = torch.stack([prefix_starts[member_group], suffix_starts], 1).flatten()
        # Per packed segment: the position of its first token and the repeated-layout row it collapses
        # onto (prefix tokens: their copy in the group's first member sequence).
        segment_positions = torch.zeros_like(segment_lens)
        segment_positions[member_segment] = member_prefix
        segment_rows = torch.empty_like(segment_lens)
        segment_rows[prefix_segment] = repeated_cu[first_member]
        segment_rows[member_segment] = repeated_cu[:-1] + member_prefix
        # All three index maps are runs of consecutive integers: one cumulative sum makes them.
        map_sizes = [self.total_tokens, self.total_tokens, self.repeated_tokens]
        self.position_ids, self.packed_to_repeated, self.repeated_index = _ranges(
            torch.cat([segment_positions, segment_rows, piece_sources]),
            torch.cat([segment_lens, segment_lens, pieces]), sum(map_sizes)).split(map_sizes)
        self.prefix_starts, self.suffix_starts, self.member_group = prefix_starts, suffix_starts, member_group
        self.repeated_cu_seqlens = repeated_cu

        # One query segment per prefix and per suffix, [q_start, q_end, causal_start, full_start,
        # full_end] (see query_blocks), and the end of the queries that read each segment's keys
        # (a prefix: the end of its group, all of its suffixes; a suffix: its own end).
        segment_ends = segment_starts + segment_lens
        full_starts = segment_starts.clone()
        full_starts[member_segment] = prefix_starts[member_group]
        full_ends = segment_starts.clone()
        full_ends[member_segment] = prefix_starts[member_group] + member_prefix
        self._segments = torch.stack([segment_starts, segment_ends, segment_starts, full_starts, full_ends], 1)
        self._key_query_ends = segment_ends.clone()
        self._key_query_ends[prefix_segment] = torch.nn.functional.pad(prefix_starts[1:], (0, 1),
                                                                       value=self.total_tokens)
        # The segment lengths, and their host copy: how many rows a block table gets, read without a sync.
        self._segment_lens = segment_lens
        self._segment_lens_host = torch.tensor(
            [n for p, ss in zip(self.prefix_lens, self.suffix_lens) for n in (p, *ss)], dtype=torch.long)
        self.device = self.position_ids.device  # "cuda" -> "cuda:N", comparable with tensors' devices
        self._query_blocks: dict[int | None, torch.Tensor] = {}
        self._key_blocks: dict[int, torch.Tensor] = {}
        # The segment table drives the torch backend; built now so compiled graphs only read it.
        self.query_blocks(None)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.prefix_lens)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.suffix_lens)

    @property
    def num_members(self) -> int:
        return sum(self.group_sizes)

    @property
    def repeated_tokens(self) -> int:
        """Tokens in the repeated-prefix layout: sum over members of ``P_g + S_gi``."""
        return sum(p * len(s) + sum(s) for p, s in zip(self.prefix_lens, self.suffix_lens))

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs the grouped attention computes (causal pairs counted once)."""
        return sum(
            p * (p + 1) // 2 + sum(s * p + s * (s + 1) // 2 for s in ss)
            for p, ss in zip(self.prefix_lens, self.suffix_lens)
        )

    @property
    def repeated_attention_pairs(self) -> int:
        """(query, key) pairs causal attention computes on the repeated-prefix layout."""
        return sum((p + s) * (p + s + 1) // 2 for p, ss in zip(self.prefix_lens, self.suffix_lens) for s in ss)

    # -- kernel schedules ----------------------------------------------------------------------
    def query_blocks(self, block_m: int | None) -> torch.Tensor:
        """Query-block table, int32 ``(n, 5)`` on ``device``, cached per ``block_m``.

        Row ``[q_start, q_end, causal_start, full_start, full_end]``: query rows
        ``q_start..q_end-1`` (at most ``block_m``, never straddling a prefix/suffix boundary)
        attend to every key in ``full_start..full_end-1`` (the group's prefix, for suffix rows;
        empty for prefix rows) and causally to keys ``causal_start..row`` of their own segment.
        ``block_m=None`` gives one row per segment (the torch backend's table). Rows are ordered
        most work first, so the longest programs start first on a GPU.
        """
        table = self._query_blocks.get(block_m)
        if table is None:
            if block_m is None:
                rows = self._segments
            else:
                rows, offsets = self._blocks(block_m)
                rows[:, 0] += offsets
                rows[:, 1] = torch.minimum(rows[:, 0] + block_m, rows[:, 1])
            work = (rows[:, 4] - rows[:, 3]) + (rows[:, 1] - rows[:, 2])
            table = _heaviest_first(rows, work)
            self._query_blocks[block_m] = table
        return table

    def key_blocks(self, block_n: int) -> torch.Tensor:
        """Key-block table for the dK/dV backward, int32 ``(n, 3)`` on ``device``, cached per ``block_n``.

        Row ``[k_start, k_end, q_end]``: keys ``k_start..k_end-1`` (at most ``block_n``, within one
        segment) are read by exactly the queries ``q`` in ``k_start..q_end-1`` with ``q >= key``.
        For a prefix key block ``q_end`` is the end of the whole group, so one contiguous loop
        covers the prefix queries and every member's suffix: that loop is the sum over members.
        Rows are ordered most work first.
        """
        table = self._key_blocks.get(block_n)
        if table is None:
            segments, offsets = self._blocks(block_n, self._key_query_ends[:, None])
            starts = segments[:, 0] + offsets
            rows = torch.stack([starts, torch.minimum(starts + block_n, segments[:, 1]), segments[:, 5]], 1)
            table = _heaviest_first(rows, rows[:, 2] - rows[:, 0])
            self._key_blocks[block_n] = table
        return table

    def _blocks(self, block: int, *extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each segment's row (with ``extra`` columns) repeated once per ``block``-sized piece of it,
        segment by segment, and each piece's offset from its segment's start."""
        block = _as_length(block, "block size")
        total = int(((self._segment_lens_host + block - 1) // block).sum())
        counts = (self._segment_lens + block - 1) // block
        rows = torch.cat([self._segments, *extra], 1)[_range_ids(counts, total)]
        return rows, _ranges(torch.zeros_like(counts), counts, total) * block

    # -- conveniences --------------------------------------------------------------------------
    def to(self, device) -> "PrefixGroupLayout":
        """The same layout with its tensors on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return PrefixGroupLayout(self.prefix_lens, self.suffix_lens, device=device)

    def __repr__(self) -> str:
        return (
            f"PrefixGroupLayout(groups={self.num_groups}, members={self.num_members}, "
            f"total_tokens={self.total_tokens}, repeated_tokens={self.repeated_tokens}, device={self.device})"
        )
