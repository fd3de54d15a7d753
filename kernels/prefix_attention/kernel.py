"""Triton kernels of prefix-grouped attention (the ``"triton"`` backend): launches and tile tables.

The programs are in ``triton_kernels.py``. Per call:

* forward (query tile x query head): online softmax over the group's prefix keys (suffix rows) and
  then the tile's own segment (causal); writes the output and the natural-log LSE.
* ``delta = rowsum(dO * O)``.
* dQ (query tile x query head): the forward's iteration, recomputing the probabilities from the LSE.
* dK/dV (chunk row x query head): a chunk row is a key tile and a contiguous range of at most
  ``query_chunk`` of the queries that read it; for a prefix key tile that range runs over the
  prefix rows after it and then every member's suffix, so the sum over members happens in
  registers, without prefix K/V copies. Each program writes its fp32 partial; a reduction kernel
  sums a key tile's chunk rows and the query heads of its kv head (GQA) in a fixed order: no
  atomics, deterministic, and neither long prefixes nor GQA heads run serially in one program.
  Cost: two fp32 buffers of ``chunk rows x Hq x BLOCK_N x D`` (about ``T x Hq x D`` each, plus one
  key tile per extra chunk of a long group).

Prefix trees (``PrefixTreeLayout``): the same kernels over the tables of ``tree_tables``; the forward
and dQ read each query tile's key tiles from a list (``TREE``), dK/dV runs the group schedule over
subtree query ranges.

Soft-capping (``softcap = c > 0``): scores ``s = scale * q.k`` become ``c * tanh(s / c)`` before the
softmax, with the exact gradient. Sliding window (``window = W > 0``): a query at path position i
sees key j of its own path only when ``i - pos(j) < W`` (transformers' definition). Path positions:
prompt tokens ``0..P-1``, completion tokens ``P + index``. The forward and dQ skip key tiles outside
every row's window and mask only the window-edge tiles; dK/dV skip query tiles with no visible pair.

Dots run on tensor cores: fp16/bf16 directly, fp32 as 3-pass TF32 (``tf32x3``: hi/lo split, about
fp32 accuracy). fp32 is offered only where the tile table has spill-free tf32x3 tiles for every
kernel; elsewhere ``unsupported_reason`` says so and the entry points raise. Accumulation is fp32.
Head dims: multiples of 16 up to 256 (non powers of two are masked up to the next one).

Tiles: ``pyfastrl.kernels.launch_target.tile_target(device)`` picks the table (``"interpreter"``,
``"sm80"``, ``"sm90"``). The layout's block tables use ``block_sizes``; each kernel splits a table
block into its own tiles. The GPU entries were chosen by compiling every kernel for sm_80 and
sm_90a (no spills, shared memory within the limit, tensor-core dots: HMMA / HGMMA) and are to be
tuned by timing on a GPU.
"""
from __future__ import annotations

import weakref

import torch
import triton

from pyfastrl.kernels.attention_common import INTERPRETED, LOG2E
from pyfastrl.kernels.launch_target import tile_target
from pyfastrl.kernels.prefix_attention import triton_kernels as tk

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Rows of the layout's (forward, dQ, dK/dV) block tables per target, and the most queries one
# dK/dV program handles for a key tile (longer query ranges are split into chunk rows).
_TABLE_BLOCKS = {"interpreter": (16, 16, 16), "sm80": (128, 128, 128), "sm90": (128, 128, 128)}
_QUERY_CHUNK = {"interpreter": 32, "sm80": 4096, "sm90": 4096}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per target, kernel, padded head dim (64 covers <= 64)
# and whether the inputs are fp32 (tf32x3 dots). Forward/dQ: M query rows, N keys per loop tile;
# dK/dV: N keys per program, M queries per loop tile. Each entry is the first candidate, in order
# of preference (bigger tiles, more stages), that compiles for its architecture (sm_80 / sm_90a)
# with and without soft-capping and windows: no register spill, shared memory within 163 / 227 KB,
# every dot on tensor cores (wgmma on sm_90a for bf16/fp16). fp32 has entries only where some
# candidate down to 16 x 16 tiles compiled without spills. An entry with a fourth key element
# ("tree", "window" or "softcap") replaces the plain one when that option is on (looked up in that
# order): the options keep extra keys x queries tiles live, which at D=256 spills the plain dK/dV
# tiles; "tree" is the forward / dQ over a PrefixTreeLayout (key tiles read from a list).
# To be re-ranked by timing on GPUs.
_INTERPRETER_TILES = (16, 16, 1, 1)
_GPU_TILES = {
    "sm80": {
        ("forward", 64, False): (128, 64, 8, 3), ("forward", 128, False): (128, 64, 8, 3),
        ("forward", 256, False): (64, 64, 8, 2),
        ("dq", 64, False): (64, 64, 4, 3), ("dq", 128, False): (64, 64, 8, 3), ("dq", 256, False): (64, 32, 8, 2),
        ("dkdv", 64, False): (32, 64, 8, 2), ("dkdv", 128, False): (64, 64, 8, 3),
        ("dkdv", 256, False): (32, 64, 8, 2),
        ("forward", 64, True): (64, 32, 4, 2), ("dq", 64, True): (32, 32, 4, 2), ("dkdv", 64, True): (16, 16, 4, 1),
        ("dkdv", 256, False, "window"): (32, 32, 8, 2), ("dkdv", 256, False, "softcap"): (32, 32, 8, 2),
        # Trees read their key tiles from a list; fp32 then spills with two stages (8 B): one stage.
        ("forward", 64, True, "tree"): (64, 32, 4, 1),
    },
    "sm90": {
        ("forward", 64, False): (128, 64, 8, 3), ("forward", 128, False): (128, 64, 8, 3),
        ("forward", 256, False): (64, 64, 8, 2),
        # dQ and dK/dV at D=128: timed on an H100 (tune_configs.py, bf16, P=2048, 8 x 512): 4 warps
        # beat 8 (dK/dV 32-query loop tiles: step 2.15 -> 1.69 ms; dQ 2 stages: -> 1.81 ms).
        ("dq", 64, False): (64, 64, 4, 3), ("dq", 128, False): (64, 64, 4, 2), ("dq", 256, False): (64, 32, 8, 2),
        ("dkdv", 64, False): (64, 64, 8, 2), ("dkdv", 128, False): (32, 64, 4, 3),
        ("dkdv", 256, False): (32, 64, 8, 2),
        ("forward", 64, True): (64, 64, 8, 2), ("dq", 64, True): (32, 32, 4, 2), ("dkdv", 64, True): (16, 16, 4, 1),
        ("dkdv", 256, False, "window"): (32, 32, 8, 2),  # mma.sync: every 64-key (wgmma) candidate spilled
        ("forward", 64, True, "tree"): (64, 64, 8, 1),  # two stages: 255 registers and 32 B spill, one: 164
    },
}


def _target(device) -> str:
    if device is None:  # callers that only know the head dim: the device kernels would run on
        device = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
    return tile_target(torch.device(device))


def block_sizes(head_dim: int, device=None) -> tuple[int, int, int]:
    """Rows per block of the layout tables to pass: ``(forward, dQ, dK/dV)``, i.e.
    ``layout.query_blocks(fwd)``, ``layout.query_blocks(dq)``, ``layout.key_blocks(dkdv)``.
    ``device`` is where the kernels will run (default: CUDA when present, else the interpreter)."""
    del head_dim  # every kernel splits a table block into its own head-dim dependent tiles
    return _TABLE_BLOCKS[_target(device)]


def unsupported_reason(dtype: torch.dtype, head_dim: int, device) -> str | None:
    """Why these kernels refuse ``dtype`` at ``head_dim`` on ``device``, or None. fp32 runs where
    the tile table has a spill-free 3-pass-TF32 entry for every kernel (see ``_GPU_TILES``)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"backend 'triton' supports {SUPPORTED_DTYPES}, got {dtype}; use backend='torch'"
    target = _target(device)
    if target == "interpreter" or dtype != torch.float32:
        return None
    padded = max(64, triton.next_power_of_2(head_dim))
    if all((kernel, padded, True) in _GPU_TILES[target] for kernel in ("forward", "dq", "dkdv")):
        return None
    return (
        f"backend 'triton' has no fp32 kernels for head dim {head_dim} on {target} (3-pass TF32 tiles "
        "would spill registers); use backend='torch' for fp32, or fp16/bf16 inputs"
    )


def _launch_tiles(target: str, kernel: str, head_dim: int, dtype: torch.dtype, consts: dict,
                  tree: bool = False) -> dict:
    if target == "interpreter":
        block_m, block_n, num_warps, num_stages = _INTERPRETER_TILES
    else:
        table = _GPU_TILES[target]
        key = (kernel, max(64, triton.next_power_of_2(head_dim)), dtype == torch.float32)
        options = [name for name, on in (("tree", tree), ("window", consts["WINDOWED"]),
                                         ("softcap", consts["SOFTCAP"])) if on]
        key = next((key + (name,) for name in options if key + (name,) in table), key)
        block_m, block_n, num_warps, num_stages = table[key]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _common(q: torch.Tensor, k: torch.Tensor, softcap: float, window: int, scale: float):
    head_dim = q.shape[2]
    reason = unsupported_reason(q.dtype, head_dim, q.device)
    if reason is not None:
        raise TypeError(reason)
    if not softcap >= 0.0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = off), got {window!r}")
    # Scores in log2 units: s2 = q.k * score_in, or with soft-capping tanh(q.k * score_in) * score_out.
    score_in = scale / softcap if softcap > 0 else scale * LOG2E.value
    score_out = softcap * LOG2E.value
    return dict(
        NUM_HEADS=q.shape[1],
        REP=q.shape[1] // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        SOFTCAP=softcap > 0,
        WINDOWED=window > 0,
        UPCAST=INTERPRETED,
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
    ), (score_in, score_out, int(window))


def forward(q, k, v, query_blocks, scale: float, softcap: float, window: int, key_tiles=None):
    """Launch the forward. ``query_blocks`` = ``layout.query_blocks(block_sizes(D, device)[0])``;
    for a ``PrefixTreeLayout``, ``query_blocks, key_tiles`` are the first two of ``tree_tables``.
    ``softcap`` 0.0 and ``window`` 0 mean off. Inputs need unit stride in the head dim. Returns
    ``out (T, Hq, D)`` and ``lse (Hq, T)`` fp32 (natural log)."""
    num_tokens, num_heads, head_dim = q.shape
    target = _target(q.device)
    consts, (score_in, score_out, window) = _common(q, k, softcap, window, scale)
    tiles = _launch_tiles(target, "forward", head_dim, q.dtype, consts, tree=key_tiles is not None)
    split = _split(target, 0, tiles, key_tiles)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
    tk.forward_kernel[(num_heads * query_blocks.shape[0] * split,)](
        q, k, v, out, lse, query_blocks, query_blocks if key_tiles is None else key_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        num_tokens, score_in, score_out, window, SPLIT=split, TREE=key_tiles is not None, **tiles, **consts,
    )
    return out, lse


def _split(target: str, table: int, tiles: dict, key_tiles) -> int:
    """Programs per row of a forward (``table`` 0) or dQ (1) block table: a group table's rows hold
    ``_TABLE_BLOCKS`` queries, split into ``BLOCK_M`` tiles; a tree table's rows are the tiles."""
    return 1 if key_tiles is not None else _TABLE_BLOCKS[target][table] // tiles["BLOCK_M"]


def tree_tables(layout, q: torch.Tensor, k: torch.Tensor, softcap: float, window: int) -> list[torch.Tensor]:
    """The block tables of a ``PrefixTreeLayout`` for inputs like ``q``, ``k`` (dtype, head dim,
    device) and these options, on ``layout.device``: ``[query_blocks, key_tiles, dq_blocks,
    dq_key_tiles, dkdv_chunks, dkdv_reduce, positions]``. The forward and dQ tables are
    ``layout.query_tiles`` at each kernel's launch tiles (a tree's key runs are not contiguous, so the
    kernels read their key tiles from a list); dK/dV runs the group schedule on ``layout.key_blocks``
    (a segment's subtree is contiguous) with path positions for the window. Built on the host and
    copied to the device once per layout and configuration (no device sync)."""
    target = _target(q.device)
    consts, (_, _, window) = _common(q, k, softcap, window, 1.0)
    fwd, dq = (_launch_tiles(target, name, q.shape[2], q.dtype, consts, tree=True) for name in ("forward", "dq"))
    dkdv = _launch_tiles(target, "dkdv", q.shape[2], q.dtype, consts)
    query_chunk = _QUERY_CHUNK[target]

    def build():
        chunks, reduce = _build_dkdv_schedule(layout.key_blocks(dkdv["BLOCK_N"]), dkdv["BLOCK_N"], dkdv["BLOCK_N"],
                                              query_chunk)
        return (*layout.query_tiles(fwd["BLOCK_M"], fwd["BLOCK_N"], window),
                *layout.query_tiles(dq["BLOCK_M"], dq["BLOCK_N"], window), chunks, reduce,
                layout.position_ids.to(torch.int32))

    key = ("triton", fwd["BLOCK_M"], fwd["BLOCK_N"], dq["BLOCK_M"], dq["BLOCK_N"], dkdv["BLOCK_N"], query_chunk, window)
    return list(layout.device_tables(key, build))


# Schedules derived from the layout's tables, cached per table tensor (the layout keeps its tables
# alive for as long as it is reused, layer after layer): id(table) -> (weak ref, {key: schedule}).
# Keyed by id, not by the tensor: tensors compare elementwise, which dict lookups cannot use.
_SCHEDULES: dict[int, tuple[weakref.ref, dict]] = {}


def _cached(table: torch.Tensor, key, build):
    entry = _SCHEDULES.get(id(table))
    if entry is None or entry[0]() is not table:
        entry = (weakref.ref(table), {})
        _SCHEDULES[id(table)] = entry
        weakref.finalize(table, _SCHEDULES.pop, id(table), None)
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


def _dkdv_schedule(dkdv_blocks: torch.Tensor, table_block: int, block_n: int, query_chunk: int):
    """``(chunks (n, 4), reduce (m, 4))`` int32 from the key-block table ``[k_start, k_end, q_end]``:
    every table block split into key tiles of ``block_n``, every key tile's query range
    ``k_start..q_end-1`` into chunk rows ``[k_start, k_end, m_lo, m_hi]`` of at most ``query_chunk``
    (a tile's chunk rows are consecutive, in table order: most work first), and per key tile a reduce
    row ``[k_start, k_end, first chunk row, number of chunk rows]``. Tensor ops; one host sync (the
    number of chunk rows), once per table."""
    return _cached(dkdv_blocks, ("dkdv", table_block, block_n, query_chunk),
                   lambda: _build_dkdv_schedule(dkdv_blocks, table_block, block_n, query_chunk))


def _build_dkdv_schedule(dkdv_blocks, table_block, block_n, query_chunk):
    blocks = dkdv_blocks.long()
    per_block = table_block // block_n
    sub = torch.arange(per_block, device=blocks.device).repeat(blocks.shape[0])
    blocks = blocks.repeat_interleave(per_block, dim=0)
    k_start = blocks[:, 0] + sub * block_n
    k_end = torch.minimum(blocks[:, 1], k_start + block_n)
    q_end = blocks[:, 2]
    counts = torch.where(k_start < k_end, (q_end - k_start + query_chunk - 1) // query_chunk, 0)
    first = torch.cumsum(counts, 0) - counts
    num_chunks = int(counts.sum())
    tile = torch.repeat_interleave(torch.arange(counts.shape[0], device=blocks.device), counts, output_size=num_chunks)
    m_lo = k_start[tile] + (torch.arange(num_chunks, device=blocks.device) - first[tile]) * query_chunk
    chunks = torch.stack([k_start[tile], k_end[tile], m_lo, torch.minimum(m_lo + query_chunk, q_end[tile])], 1)
    reduce = torch.stack([k_start, k_end, first, counts], 1)
    return chunks.to(torch.int32).contiguous(), reduce.to(torch.int32).contiguous()


def _path_positions(dq_blocks: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(T,)`` int32 path position of every token, from a query-block table (row
    ``[q_start, q_end, causal_start, full_start, full_end]``: position = t - causal_start + prefix
    length). Tensor ops, no host sync; cached per table."""
    return _cached(dq_blocks, ("positions", num_tokens), lambda: _build_path_positions(dq_blocks, num_tokens))


def _build_path_positions(dq_blocks, num_tokens):
    q_start, q_end, causal_start, full_start, full_end = dq_blocks.long().unbind(1)
    counts = q_end - q_start
    row = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=num_tokens)
    token = q_start[row] + torch.arange(num_tokens, device=counts.device) - (torch.cumsum(counts, 0) - counts)[row]
    positions = torch.empty(num_tokens, dtype=torch.int32, device=counts.device)
    positions[token] = (token - causal_start[row] + full_end[row] - full_start[row]).to(torch.int32)
    return positions


def backward(grad_out, q, k, v, out, lse, dq_blocks, dkdv_blocks, scale: float, softcap: float, window: int):
    """Launch the backward; the block tables come from ``block_sizes(D, device)[1:]``, ``softcap``
    and ``window`` as in the forward. Returns ``(dq, dk, dv)`` in the inputs' dtype."""
    target = _target(q.device)
    consts, _ = _common(q, k, softcap, window, scale)
    tiles = _launch_tiles(target, "dkdv", q.shape[2], q.dtype, consts)
    chunks, reduce = _dkdv_schedule(dkdv_blocks, _TABLE_BLOCKS[target][2], tiles["BLOCK_N"], _QUERY_CHUNK[target])
    positions = _path_positions(dq_blocks, q.shape[0]) if window > 0 else dq_blocks  # unread without a window
    return _backward(grad_out, q, k, v, out, lse, dq_blocks, None, chunks, reduce, positions, scale, softcap, window)


def tree_backward(grad_out, q, k, v, out, lse, tables, scale: float, softcap: float, window: int):
    """``backward`` over a ``PrefixTreeLayout``: ``tables`` = ``tree_tables(layout, q, k, softcap, window)``."""
    _, _, dq_blocks, dq_key_tiles, chunks, reduce, positions = tables
    return _backward(grad_out, q, k, v, out, lse, dq_blocks, dq_key_tiles, chunks, reduce, positions,
                     scale, softcap, window)


def _backward(grad_out, q, k, v, out, lse, dq_blocks, dq_key_tiles, chunks, reduce, positions,
              scale, softcap, window):
    """The launches of the backward: delta, dQ over ``dq_blocks`` (and ``dq_key_tiles`` for a tree),
    dK/dV over the chunk rows ``chunks`` and their reduction ``reduce`` (``_dkdv_schedule``), with
    ``positions (T,)`` int32 the path positions (read with a window only)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    target = _target(q.device)
    consts, (score_in, score_out, window) = _common(q, k, softcap, window, scale)
    block_d = consts["BLOCK_D"]
    delta = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
    tk.delta_kernel[(num_heads * triton.cdiv(num_tokens, 64),)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), num_tokens,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64,
    )
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1),
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tiles = _launch_tiles(target, "dq", head_dim, q.dtype, consts, tree=dq_key_tiles is not None)
    split = _split(target, 1, tiles, dq_key_tiles)
    tk.dq_kernel[(num_heads * dq_blocks.shape[0] * split,)](
        q, k, v, grad_out, lse, delta, dq, dq_blocks, dq_blocks if dq_key_tiles is None else dq_key_tiles,
        *strides, dq.stride(0), dq.stride(1), num_tokens, scale, score_in, score_out, window,
        SPLIT=split, TREE=dq_key_tiles is not None, **tiles, **consts,
    )

    tiles = _launch_tiles(target, "dkdv", head_dim, q.dtype, consts)
    part_shape = (chunks.shape[0], num_heads, tiles["BLOCK_N"], block_d)
    part_dk = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_dv = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    tk.dkdv_kernel[(num_heads * chunks.shape[0],)](
        q, k, v, grad_out, lse, delta, positions, part_dk, part_dv, chunks, *strides,
        num_tokens, score_in, score_out, window, **tiles, **consts,
    )
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    reduce_consts = dict(NUM_KV_HEADS=num_kv_heads, REP=consts["REP"], HEAD_DIM=head_dim, BLOCK_D=block_d,
                         BLOCK_N=tiles["BLOCK_N"], ROWS=min(16, tiles["BLOCK_N"]))
    for part, grad, grad_scale in ((part_dk, dk, scale), (part_dv, dv, 1.0)):
        tk.dkdv_reduce_kernel[(num_kv_heads * reduce.shape[0],)](
            part, grad, reduce, grad.stride(0), grad.stride(1), grad_scale, **reduce_consts,
        )
    return dq, dk, dv
