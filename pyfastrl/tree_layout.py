"""The packed prefix-tree layout: prompts shared at several levels (multi-turn conversations).

A batch of sequences that share prefixes at several depths (a conversation's system prompt, its
first turn, several sampled replies to each turn, ...) is a forest of *segments*: runs of tokens
packed once, each the child of the segment it continues. Segments are packed in depth-first
preorder, so every subtree is one contiguous run of segments::

    [ root | child_a | grandchild_a0 | grandchild_a1 | child_b | ... | next root | ... ]

A token attends to every token of every ancestor segment and causally within its own segment:
exactly what it would see if its root-to-leaf path were a sequence of its own. The *repeated
layout* is that batch of paths, one sequence per leaf segment.

A layout is built once per batch on the host (loops over segments, never over tokens) and its index
tensors are moved to ``device`` once; nothing is read back from the device afterwards.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from pyfastrl.layout import _as_length, _exclusive_cumsum, _heaviest_first, _range_ids, _ranges, _to_device

__all__ = ["PrefixTreeLayout"]

# Columns of ``PrefixTreeLayout.segment_table``, of a key run (``_merged_runs``) and of a key tile
# (``PrefixTreeLayout.query_tiles``).
SEGMENT_TABLE_COLUMNS = 4
KEY_RUN_COLUMNS = 5
KEY_TILE_COLUMNS = 4
# Key-tile mask codes: every key of the tile visible to every row; mask by range and window;
# mask causally too (the tile reaches the query rows' own keys).
UNMASKED, MASKED, MASKED_CAUSAL = 0, 1, 2


def _as_list(value, name: str) -> list:
    """``value`` (a sequence or a 1-D tensor) as a non-empty Python list."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence, got a tensor of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of integers (list, tuple or 1-D tensor), "
                         f"got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: a layout needs at least one segment")
    return list(value)


def _as_parent(value, segment: int) -> int:
    where = f"parents[{segment}] (segment {segment})"
    if isinstance(value, (bool, float)):
        raise ValueError(f"{where} must be an integer (-1 for a root), got {value!r}")
    try:
        parent = operator.index(value)
    except TypeError:
        raise ValueError(f"{where} must be an integer (-1 for a root), got {value!r}") from None
    if not -1 <= parent < segment:
        raise ValueError(
            f"{where} is {parent}: a parent must be -1 (a root) or an earlier segment (0..{segment - 1}), "
            "since segments are packed in depth-first preorder"
        )
    return parent


def _validated(parents, lengths) -> tuple[list[int], list[int]]:
    parents = _as_list(parents, "parents")
    lengths = _as_list(lengths, "lengths")
    if len(parents) != len(lengths):
        raise ValueError(f"parents and lengths must have one entry per segment, got {len(parents)} parents "
                         f"and {len(lengths)} lengths")
    parents = [_as_parent(p, i) for i, p in enumerate(parents)]
    lengths = [_as_length(n, f"lengths[{i}] (segment {i})") for i, n in enumerate(lengths)]
    # Preorder with contiguous subtrees: a segment's parent is on the path of the segment before it
    # (the parent's subtree is still open); -1 opens a new tree.
    path: list[int] = []
    for i, parent in enumerate(parents):
        if parent == -1:
            path.clear()
        else:
            if parent not in path:
                raise ValueError(
                    f"parents[{i}] (segment {i}) is {parent}, but segment {parent}'s subtree ended before "
                    f"segment {i} (segment {i - 1}'s path is {path}): segments must be in depth-first "
                    "preorder, every subtree contiguous"
                )
            del path[path.index(parent) + 1:]
        path.append(i)
    return parents, lengths


def _merged_runs(segment: int, path: list[int], starts, lengths, offsets) -> list[list[int]]:
    """The keys ``segment``'s tokens see, as runs of consecutive packed indices: the segments of its
    path (root first, itself last), merged where one ends where the next starts (a first child).
    Rows ``[segment, lo, hi, shift, causal]``: a query row t and key j of the run lie ``t - j - shift``
    apart along the path; the last run (its own keys, after any ancestors contiguous with them) is
    seen causally, with shift 0."""
    def packed_minus_path(s):  # packed index minus path position, constant along a merged run
        return starts[s] - offsets[s]

    runs: list[list[int]] = []
    for s in path:
        if runs and runs[-1][2] == starts[s]:
            runs[-1][2] += lengths[s]
        else:
            runs.append([segment, starts[s], starts[s] + lengths[s],
                         packed_minus_path(segment) - packed_minus_path(s), 0])
    runs[-1][4] = 1
    return runs


class PrefixTreeLayout:
    """Where each segment of a forest of shared prefixes sits in a packed batch.

    Args:
        parents: ``[p_0, p_1, ...]``, one entry per segment in packing order (depth-first preorder:
            every subtree contiguous): ``p_i < i`` is segment i's parent, or -1 for a root. A list,
            tuple or 1-D integer tensor.
        lengths: ``[n_0, n_1, ...]``, the tokens of each segment, each >= 1.
        device: where the index tensors live; must be the device of the attention inputs.

    A one-level tree (roots = prompts, their children = completions) is the batch of
    ``PrefixGroupLayout``. Raises ValueError naming the segment for a parent that is not -1 or an
    earlier segment, a tree not in preorder, a length < 1 or a non-integer entry.

    Attributes (host):
        parents, lengths: the validated lists of Python ints.
        num_segments: N. total_tokens: T, tokens in the packed batch.
        segment_offsets: list, each segment's first token's position along its path (the tokens of
            its ancestors).
        leaves: list, the leaf segments (those with no children) in packing order; one
            repeated-layout sequence per leaf, its root-to-leaf path.
        num_leaves, longest_sequence (the longest path, in tokens), repeated_tokens.
        segment_table: ``(N, 4)`` int64 on the CPU (read by the torch backend without a device sync):
            per segment ``[start, end, ancestor_offset, ancestor_tokens]``: packed tokens
            ``start..end-1``, and its ancestors' packed indices are
            ``ancestor_index[ancestor_offset : ancestor_offset + ancestor_tokens]``.

    Attributes (tensors on ``device``):
        segment_starts: ``(N,)`` int64, packed index of each segment's first token.
        position_ids: ``(T,)`` int64, each token's position along its root-to-leaf path (the rotary
            phase it has in the repeated layout).
        ancestor_index: ``(A,)`` int64, per segment in order the packed indices of its ancestors'
            tokens, root first (the keys its tokens see besides their own segment).
        repeated_index: ``(R,)`` int64. The repeated layout concatenates, leaf by leaf, the tokens of
            the leaf's root-to-leaf path; row r of it is packed token ``repeated_index[r]``.
        repeated_cu_seqlens: ``(num_leaves + 1,)`` int64 offsets of the paths in that layout.
        packed_to_repeated: ``(T,)`` int64, a repeated-layout row holding each packed token (its copy
            in the first leaf below its segment).
    """

    def __init__(self, parents: Sequence[int], lengths: Sequence[int], device=None):
        self.parents, self.lengths = _validated(parents, lengths)
        self.device = torch.device("cpu" if device is None else device)
        parents, lengths = self.parents, self.lengths
        n = len(parents)

        # Host: per segment (no loop over tokens).
        starts, offsets, total = [], [], 0
        for i, parent in enumerate(parents):
            starts.append(total)
            total += lengths[i]
            offsets.append(0 if parent == -1 else offsets[parent] + lengths[parent])
        self.total_tokens = total
        self.segment_offsets = offsets
        # In preorder a segment has children iff the next segment is its child.
        has_child = [False] * n
        for i in range(1, n):
            if parents[i] != -1:
                has_child[parents[i]] = True
        self.leaves = [i for i in range(n) if not has_child[i]]
        path_lengths = [offsets[i] + lengths[i] for i in self.leaves]
        self.longest_sequence = max(path_lengths)
        self.repeated_tokens = sum(path_lengths)

        # The first leaf at or after a segment is the first leaf below it (preorder: the segments in
        # between are its first child, that child's first child, ...).
        first_leaf = [0] * n
        leaf_rank = {leaf: r for r, leaf in enumerate(self.leaves)}
        following = None
        for i in range(n - 1, -1, -1):
            if i in leaf_rank:
                following = leaf_rank[i]
            first_leaf[i] = following
        repeated_cu = [0]
        for length in path_lengths:
            repeated_cu.append(repeated_cu[-1] + length)
        segment_rows = [repeated_cu[first_leaf[i]] + offsets[i] for i in range(n)]

        # Pieces (runs of consecutive packed indices) of the ancestor keys and of the paths.
        def ancestors(i):
            chain = []
            while parents[i] != -1:
                i = parents[i]
                chain.append(i)
            return chain[::-1]

        ancestor_pieces, table, ancestor_tokens, key_runs = [], [], 0, []
        for i in range(n):
            table.append([starts[i], starts[i] + lengths[i], ancestor_tokens, offsets[i]])
            chain = ancestors(i)
            ancestor_pieces += chain
            ancestor_tokens += offsets[i]  # a segment's ancestors hold its path offset's tokens
            key_runs += _merged_runs(i, [*chain, i], starts, lengths, offsets)
        self._key_runs = torch.tensor(key_runs, dtype=torch.long).reshape(-1, KEY_RUN_COLUMNS)
        # A subtree is contiguous: it ends where its last descendant (or the segment itself) ends.
        subtree_ends = [s + m for s, m in zip(starts, lengths)]
        for i in range(n - 1, 0, -1):
            if parents[i] != -1:
                subtree_ends[parents[i]] = max(subtree_ends[parents[i]], subtree_ends[i])
        self._subtree_ends = torch.tensor(subtree_ends, dtype=torch.long)
        path_pieces = [s for leaf in self.leaves for s in (*ancestors(leaf), leaf)]
        self.segment_table = torch.tensor(table, dtype=torch.long).reshape(n, SEGMENT_TABLE_COLUMNS)

        # Device: the host lists go over once; every token-level map is one cumulative sum.
        host = torch.tensor(
            [*starts, *repeated_cu,
             *offsets, *segment_rows, *(starts[s] for s in path_pieces), *(starts[a] for a in ancestor_pieces),
             *lengths, *lengths, *(lengths[s] for s in path_pieces), *(lengths[a] for a in ancestor_pieces)],
            dtype=torch.long)
        pieces = 2 * n + len(path_pieces) + len(ancestor_pieces)
        segment_starts, repeated_cu_seqlens, run_starts, run_lengths = _to_device(host, self.device).split(
            [n, len(repeated_cu), pieces, pieces])
        sizes = [total, total, self.repeated_tokens, ancestor_tokens]
        (self.position_ids, self.packed_to_repeated, self.repeated_index,
         self.ancestor_index) = _ranges(run_starts, run_lengths, sum(sizes)).split(sizes)
        self.segment_starts = segment_starts
        self.repeated_cu_seqlens = repeated_cu_seqlens
        self.device = self.position_ids.device  # "cuda" -> "cuda:N", comparable with tensors' devices
        self._device_tables: dict = {}

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self.parents)

    @property
    def num_leaves(self) -> int:
        return len(self.leaves)

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs the tree attention computes (shared pairs counted once)."""
        return sum(n * o + n * (n + 1) // 2 for n, o in zip(self.lengths, self.segment_offsets))

    @property
    def repeated_attention_pairs(self) -> int:
        """(query, key) pairs causal attention computes on the repeated layout (one path per leaf)."""
        return sum((o + self.lengths[i]) * (o + self.lengths[i] + 1) // 2
                   for i, o in ((i, self.segment_offsets[i]) for i in self.leaves))

    # -- construction from token ids ---------------------------------------------------------
    @classmethod
    def from_sequences(cls, sequences, device=None) -> tuple["PrefixTreeLayout", list[torch.Tensor]]:
        """The trie-compressed layout of token-id sequences, sharing every common prefix.

        Args:
            sequences: a non-empty list of non-empty token-id sequences: lists/tuples of ints or
                1-D integer tensors (a CUDA tensor is copied to the host: this is batch building).
            device: where the layout's tensors and the returned indices live.

        Returns:
            ``(layout, token_index)``: ``token_index[i]`` is a ``(len(sequences[i]),)`` int64
            tensor on ``device``, the packed index of each token of sequence i in order, so
            ``packed[token_index[i]]`` is that sequence (gather its log-probs; index_add / scatter
            per-sequence values back).

        Every token shared by several sequences (a common prefix) is packed once. Segment boundaries
        fall wherever sequences diverge and wherever a sequence ends, so every sequence ends at the
        end of a segment: a sequence that is a strict prefix of another is a path ending at an inner
        segment (its tokens shared with the longer one), and identical sequences map to the same
        packed tokens (equal ``token_index``). Trees, and children within a tree, come in the order
        of their first sequence in ``sequences``. A GRPO batch of G completions of one prompt that
        differ at their first token gives one prompt segment with G children: P + sum(S_i) tokens.

        Raises ValueError naming the sequence for an empty sequence, non-integer tokens or a
        tensor that is not 1-D.
        """
        rows, values = _token_rows(sequences)
        order, shared = _sorted_common_prefixes(rows, values)

        # Trie nodes (a node ends a segment): depth = tokens from the root to its end.
        node_depth, node_parent, node_children = [0], [-1], [[]]
        end_node = [0] * len(rows)

        def new_node(depth, parent):
            node_depth.append(depth)
            node_parent.append(parent)
            node_children.append([])
            return len(node_depth) - 1

        stack = [0]  # the virtual root (depth 0) and the nodes of the previous sequence's path
        for rank, seq in enumerate(order):
            common = shared[rank]
            popped = None
            while node_depth[stack[-1]] > common:
                popped = stack.pop()
            if node_depth[stack[-1]] < common:  # split the popped segment where this sequence leaves it
                top = stack[-1]
                middle = new_node(common, top)
                node_children[top][node_children[top].index(popped)] = middle
                node_children[middle].append(popped)
                node_parent[popped] = middle
                stack.append(middle)
            if len(rows[seq]) > common:
                leaf = new_node(len(rows[seq]), stack[-1])
                node_children[stack[-1]].append(leaf)
                stack.append(leaf)
            end_node[seq] = stack[-1]
        # First-seen order: a node's subtree is keyed by the earliest sequence through it. In input
        # order, a walk up a path stops at the first node an earlier sequence already keyed.
        node_first = [len(rows)] * len(node_depth)
        for seq, node in enumerate(end_node):
            while node > 0 and seq < node_first[node]:
                node_first[node] = seq
                node = node_parent[node]

        # Preorder: node -> segment index.
        segment_of = {}
        parents, lengths = [], []
        pending = sorted(node_children[0], key=node_first.__getitem__, reverse=True)
        while pending:
            node = pending.pop()
            segment_of[node] = len(parents)
            parent = node_parent[node]
            parents.append(-1 if parent == 0 else segment_of[parent])
            lengths.append(node_depth[node] - node_depth[parent])
            pending += sorted(node_children[node], key=node_first.__getitem__, reverse=True)
        layout = cls(parents, lengths, device=device)

        # Each sequence's packed tokens: the runs of the segments on its path (loop over segments).
        run_starts, run_lengths = [], []
        starts = layout.segment_table[:, 0].tolist()
        for node in end_node:
            path = []
            while node > 0:
                path.append(segment_of[node])
                node = node_parent[node]
            run_starts += [starts[s] for s in reversed(path)]
            run_lengths += [lengths[s] for s in reversed(path)]
        sizes = [len(r) for r in rows]
        host = torch.tensor([*run_starts, *run_lengths], dtype=torch.long)
        run_starts_t, run_lengths_t = _to_device(host, layout.device).split(len(run_starts))
        token_index = list(_ranges(run_starts_t, run_lengths_t, sum(sizes)).split(sizes))
        return layout, token_index

    @staticmethod
    def packed_token_count(sequences) -> int:
        """``from_sequences(sequences)[0].total_tokens`` counted on the host without building the
        layout (nothing goes to a device): every distinct prefix once, that is the total length less
        each sequence's common prefix with its predecessor in sorted order. Args and errors as
        ``from_sequences``."""
        rows, values = _token_rows(sequences)
        return sum(len(row) for row in rows) - sum(_sorted_common_prefixes(rows, values)[1])

    # -- kernel tables -------------------------------------------------------------------------
    def query_tiles(self, block_m: int, block_n: int, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward / dQ tables of the Triton backend: ``(rows (P, 5), tiles (K, 4))`` int32 on the CPU.

        Row ``[q_start, q_end, segment_start, first_tile, end_tile]``: query rows ``q_start..q_end-1``
        (at most ``block_m``, within one segment) read the key tiles ``tiles[first_tile:end_tile]``;
        rows are ordered most key tiles first. Tile ``[key_start, key_end, shift, mask]``: keys
        ``key_start..min(key_start + block_n, key_end) - 1`` of one run of ``_merged_runs``, whose
        path positions lie ``t - j - shift`` before query row t's; ``mask`` is ``UNMASKED`` (every key
        visible to every row), ``MASKED`` (check the range and the window) or ``MASKED_CAUSAL`` (also
        key <= row). With ``window`` W >= 1 (0: off) tiles outside every row's window are left out.
        Vectorised over (program, run) pairs and tiles; nothing per token.
        """
        block_n = _as_length(block_n, "block_n")
        segment, q_start, q_end = self._pieces(block_m, "block_m")  # one program each
        num_programs = segment.shape[0]

        # Every program against every key run of its segment (a segment's runs are consecutive).
        run_counts = torch.bincount(self._key_runs[:, 0], minlength=self.num_segments)
        pair_counts = run_counts[segment]
        num_pairs = int(pair_counts.sum())
        program = _range_ids(pair_counts, num_pairs)
        run = _ranges(_exclusive_cumsum(run_counts)[segment], pair_counts, num_pairs)
        _, lo, hi, shift, causal = self._key_runs[run].unbind(1)
        rows_start, rows_end = q_start[program], q_end[program]
        hi = torch.where(causal == 1, rows_end, hi)
        unmasked_end = torch.where(causal == 1, rows_start + 1, hi)  # keys up to the first row: seen by all
        first_full = torch.zeros_like(lo)
        if window:
            lo = torch.maximum(lo, rows_start - shift - window + 1)
            # Keys below the last row's first visible key are out of some row's window: edge tiles.
            first_full = (rows_end - shift - window - lo + block_n - 1).clamp(min=0) // block_n
        tiles = ((hi - lo).clamp(min=0) + block_n - 1) // block_n
        first_full = torch.minimum(first_full, tiles)
        last_full = torch.maximum(first_full, (unmasked_end - lo).clamp(min=0) // block_n)

        num_tiles = int(tiles.sum())
        pair = torch.repeat_interleave(torch.arange(num_pairs), tiles, output_size=num_tiles)
        index = torch.arange(num_tiles) - _exclusive_cumsum(tiles)[pair]
        masked = (index < first_full[pair]) | (index >= last_full[pair])
        key_tiles = torch.stack([lo[pair] + index * block_n, hi[pair], shift[pair],
                                 masked.long() * (MASKED + causal[pair])], 1)
        program_tiles = torch.zeros(num_programs, dtype=torch.long).index_add_(0, program, tiles)
        end_tile = torch.cumsum(program_tiles, 0)
        rows = torch.stack([q_start, q_end, self.segment_table[segment, 0], end_tile - program_tiles, end_tile], 1)
        return _heaviest_first(rows, program_tiles), key_tiles.to(torch.int32).contiguous()

    def key_blocks(self, block_n: int) -> torch.Tensor:
        """dK/dV table of the Triton backend, int32 ``(n, 3)`` on the CPU, the format of
        ``PrefixGroupLayout.key_blocks``: row ``[k_start, k_end, q_end]``, keys ``k_start..k_end-1``
        (at most ``block_n``, within one segment) are read by exactly the queries ``q`` in
        ``k_start..q_end-1`` with ``q >= key``: ``q_end`` is the end of the segment's subtree
        (contiguous in preorder), so one loop covers every path through the keys. Most work first."""
        segment, k_start, k_end = self._pieces(block_n, "block_n")
        q_end = self._subtree_ends[segment]
        return _heaviest_first(torch.stack([k_start, k_end, q_end], 1), q_end - k_start)

    def _pieces(self, block: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every segment cut into pieces of at most ``block`` tokens, in packing order: each piece's
        ``(segment, start, end)``, int64 on the CPU (host tensors: no device sync)."""
        block = _as_length(block, name)
        starts, ends = self.segment_table[:, 0], self.segment_table[:, 1]
        counts = (ends - starts + block - 1) // block
        total = int(counts.sum())
        segment = _range_ids(counts, total)
        piece_starts = starts[segment] + _ranges(torch.zeros_like(counts), counts, total) * block
        return segment, piece_starts, torch.minimum(piece_starts + block, ends[segment])

    def device_tables(self, key, build) -> tuple[torch.Tensor, ...]:
        """Kernel tables derived from this layout: ``build()``'s host tensors copied to ``device``,
        built and copied once per hashable ``key`` (the layout is reused by every layer)."""
        tables = self._device_tables.get(key)
        if tables is None:
            tables = tuple(_to_device(t, self.device) for t in build())
            self._device_tables[key] = tables
        return tables

    # -- conveniences --------------------------------------------------------------------------
    def to(self, device) -> "PrefixTreeLayout":
        """The same layout with its tensors on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return PrefixTreeLayout(self.parents, self.lengths, device=device)

    def __repr__(self) -> str:
        return (
            f"PrefixTreeLayout(segments={self.num_segments}, leaves={self.num_leaves}, "
            f"total_tokens={self.total_tokens}, repeated_tokens={self.repeated_tokens}, device={self.device})"
        )


def _token_rows(sequences) -> tuple[list[tuple[int, ...]], list[torch.Tensor]]:
    """The sequences, checked, as tuples of Python ints and as 1-D int64 CPU tensors."""
    if isinstance(sequences, torch.Tensor) or isinstance(sequences, (str, bytes)) \
            or not isinstance(sequences, Sequence):
        raise ValueError("sequences must be a list of token-id sequences (lists of ints or 1-D tensors), "
                         f"got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError("sequences is empty: a layout needs at least one sequence")
    rows, tensors = [], []
    for i, seq in enumerate(sequences):
        if isinstance(seq, (torch.Tensor, Sequence)) and not isinstance(seq, (str, bytes)) and len(seq) == 0:
            raise ValueError(f"sequences[{i}] is empty: every sequence needs at least one token")
        if isinstance(seq, torch.Tensor):
            if seq.dim() != 1:
                raise ValueError(f"sequences[{i}] must be a 1-D tensor of token ids, got shape {tuple(seq.shape)}")
            if seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool:
                raise ValueError(f"sequences[{i}] must hold integer token ids, got dtype {seq.dtype}")
            values = seq.detach().to("cpu", torch.long)
        elif isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"sequences[{i}] must be a list of token ids or a 1-D tensor, got {type(seq).__name__}")
        else:
            try:
                values = torch.tensor(seq)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"sequences[{i}] must be a flat list of integer token ids") from None
            if values.dim() > 1:
                raise ValueError(f"sequences[{i}] must be a flat list of token ids, got nested lists")
            if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
                raise ValueError(f"sequences[{i}] must hold integer token ids, got {values.dtype} values")
            values = values.long()
        rows.append(tuple(values.tolist()))
        tensors.append(values)
    return rows, tensors


def _sorted_common_prefixes(rows: list[tuple[int, ...]], values: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """The sequences' lexicographic order, and in that order each one's common prefix length with its
    predecessor (0 for the first). Sorted, sequences sharing a prefix are adjacent, and the longest
    prefix a sequence shares with any earlier one is the one it shares with its predecessor."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    return order, _common_prefix_lengths([values[i] for i in order])


def _common_prefix_lengths(rows: list[torch.Tensor]) -> list[int]:
    """``[0, lcp(rows[0], rows[1]), lcp(rows[1], rows[2]), ...]`` of 1-D int64 CPU tensors, compared
    as one padded tensor (no Python loop over tokens)."""
    if len(rows) == 1:
        return [0]
    tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    lengths = torch.tensor([len(r) for r in rows])
    valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    same = (tokens[1:] == tokens[:-1]) & valid[1:] & valid[:-1]
    return [0, *torch.cumprod(same.long(), 1).sum(1).tolist()]
