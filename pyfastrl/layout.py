"""The packed shared-prefix layout: B groups, each a prefix followed by its members' suffixes.

See ``shared/specs/prefix-grouped-attention.md``. Tokens are packed with no padding::

    [ prefix_0 | suffix_0,0 | ... | suffix_0,G0-1 | prefix_1 | suffix_1,0 | ... ]

A layout is built once per batch and passed to every attention layer; the block schedules the
kernels iterate over are computed from it once and cached on it.
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

        prefix_starts, suffix_starts, member_group, positions = [], [], [], []
        repeated_index, repeated_cu, packed_to_repeated = [], [0], []
        segments = []  # one query segment per prefix and per suffix (see query_blocks)
        cursor = 0
        for g, (plen, slens) in enumerate(zip(self.prefix_lens, self.suffix_lens)):
            p0 = cursor
            prefix_starts.append(p0)
            positions.extend(range(plen))
            segments.append((p0, p0 + plen, p0, p0, p0))
            # Prefix tokens collapse onto their copy in this group's first member sequence.
            packed_to_repeated.extend(range(repeated_cu[-1], repeated_cu[-1] + plen))
            cursor += plen
            for slen in slens:
                s0 = cursor
                suffix_starts.append(s0)
                member_group.append(g)
                positions.extend(range(plen, plen + slen))
                segments.append((s0, s0 + slen, s0, p0, p0 + plen))
                seq_start = repeated_cu[-1]
                repeated_index.extend(range(p0, p0 + plen))
                repeated_index.extend(range(s0, s0 + slen))
                packed_to_repeated.extend(range(seq_start + plen, seq_start + plen + slen))
                repeated_cu.append(seq_start + plen + slen)
                cursor += slen
        self.total_tokens = cursor
        # Longest P_g + S_gi (a repeated-layout sequence); read by every layer's sliding-window check.
        self.longest_sequence = max(p + max(ss) for p, ss in zip(self.prefix_lens, self.suffix_lens))
        self._segments = segments
        self._group_ends = {}  # packed start of a prefix -> end of its group (all of its suffixes)
        for g, p0 in enumerate(prefix_starts):
            self._group_ends[p0] = p0 + self.prefix_lens[g] + sum(self.suffix_lens[g])

        as_long = dict(dtype=torch.long, device=self.device)
        self.position_ids = torch.tensor(positions, **as_long)
        self.prefix_starts = torch.tensor(prefix_starts, **as_long)
        self.suffix_starts = torch.tensor(suffix_starts, **as_long)
        self.member_group = torch.tensor(member_group, **as_long)
        self.repeated_index = torch.tensor(repeated_index, **as_long)
        self.repeated_cu_seqlens = torch.tensor(repeated_cu, **as_long)
        self.packed_to_repeated = torch.tensor(packed_to_repeated, **as_long)
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
            rows = []
            for q0, q1, c0, f0, f1 in self._segments:
                step = (q1 - q0) if block_m is None else block_m
                rows.extend((b, min(b + step, q1), c0, f0, f1) for b in range(q0, q1, step))
            rows.sort(key=lambda r: (r[4] - r[3]) + (r[1] - r[2]), reverse=True)
            table = torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(-1, QUERY_BLOCK_COLUMNS)
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
            rows = []
            for q0, q1, _, f0, f1 in self._segments:
                q_end = self._group_ends[q0] if f0 == f1 else q1
                rows.extend((b, min(b + block_n, q1), q_end) for b in range(q0, q1, block_n))
            rows.sort(key=lambda r: r[2] - r[0], reverse=True)
            table = torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(-1, KEY_BLOCK_COLUMNS)
            self._key_blocks[block_n] = table
        return table

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
