"""Torch implementations of the cache and attention kernels.

They are the engine's CPU path and the oracle the CUDA kernels are tested against, so they
are vectorised: K/V are gathered through the block tables with one index operation, and the
attention itself is two batched matmuls around a softmax for decode and torch's
scaled_dot_product_attention for prefill. Half types are computed in fp32.

KV cache layout (one pool): [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim],
index 0 of dim 2 is K, 1 is V; slot s lives at block s // block_size, offset s % block_size.

Sliding-window attention: with `window` W > 0, the query at position p sees positions
p - W + 1 .. p (transformers' sliding-window mask: key j is visible when p - j < W); 0 is
full causal attention. Blocks that lie wholly before a row's window are never read (their
table entries may name blocks that were freed and reused, so they are replaced by block 0 and
masked, like the padding past a row's last block).
"""

from __future__ import annotations

import bisect
import functools

import torch
import torch.nn.functional as F

__all__ = [
    "reshape_and_cache",
    "paged_attention_decode",
    "paged_attention_prefill",
    "copy_blocks",
    "swap_blocks",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 stays fp32; half types accumulate in fp32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's K/V ([T, Hkv, D]) into slot slot_mapping[t] of `layer`; slots < 0 are skipped."""
    block_size = kv_cache.shape[3]
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep.to(key.device)], value[keep.to(value.device)]
    if slots.numel() == 0:
        return
    blocks, offsets = slots // block_size, slots % block_size
    layer_view = kv_cache[:, layer]  # [num_blocks, 2, block_size, Hkv, D], a view
    layer_view[:, 0].index_put_((blocks, offsets), key.to(kv_cache.dtype))
    layer_view[:, 1].index_put_((blocks, offsets), value.to(kv_cache.dtype))


def _gather_kv(
    kv_cache: torch.Tensor, layer: int, tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks in `tables` ([..., n]) as [..., n * block_size, Hkv, D]."""
    layer_view = kv_cache[:, layer]
    k = layer_view[:, 0][tables]  # [..., n, block_size, Hkv, D]
    v = layer_view[:, 1][tables]
    shape = (*tables.shape[:-1], -1, kv_cache.shape[4], kv_cache.shape[5])
    return k.reshape(shape), v.reshape(shape)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool = False,
) -> torch.Tensor:
    """q [N, Hq, Lq, D], k/v [N, Hkv, Lk, D] (Hq a multiple of Hkv) -> [N, Hq, Lq, D]."""
    dtype = _compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


# A decode batch mixes short and long contexts. Padding every row to the longest would read
# (and, here, copy) far more K/V than the rows hold, most of all under continuous batching.
# Rows are sorted longest first and their key range cut into a few chunks; a chunk attends
# only the rows that reach into it, a staircase whose area is close to the K/V held.
CHUNK_COST_TOKENS = 512  # the fixed cost of one more chunk, in K/V tokens gathered


@functools.lru_cache(maxsize=16)  # every layer of a step asks for the same rows
def decode_chunks(blocks_desc: tuple[int, ...], block_size: int) -> tuple[tuple[int, int, int], ...]:
    """Chunks (rows, first block, end block) for rows sorted by block count, longest first:
    (n, b0, b1) covers blocks b0..b1-1 of the first n rows, those with more than b0 blocks.
    Cuts are tried at the lengths of the rows at ranks B/k (k = 2, 4, 8), and at none; the
    cheapest set in tokens gathered plus CHUNK_COST_TOKENS per chunk wins."""
    total, num_rows = blocks_desc[0], len(blocks_desc)
    negated = [-b for b in blocks_desc]  # ascending, for bisect

    def rows_past(block: int) -> int:
        return bisect.bisect_left(negated, -block)

    def chunks(cuts: list[int]) -> list[tuple[int, int, int]]:
        edges = [0, *cuts, total]
        return [(rows_past(b0), b0, b1) for b0, b1 in zip(edges, edges[1:])]

    def cost(plan: list[tuple[int, int, int]]) -> int:
        return sum(n * (b1 - b0) for n, b0, b1 in plan) * block_size + CHUNK_COST_TOKENS * len(plan)

    plans = [chunks([])]
    for k in (2, 4, 8):
        cuts = {blocks_desc[min(num_rows - 1, num_rows * i // k)] for i in range(1, k)} - {0, total}
        plans.append(chunks(sorted(cuts)))
    return tuple(min(plans, key=cost))


def paged_attention_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """One query token per sequence ([B, Hq, D]) over its first context_lens[b] cached tokens
    (the last `window` of them when window > 0)."""
    num_seqs, num_heads, head_dim = query.shape
    device, block_size, num_kv_heads = kv_cache.device, kv_cache.shape[3], kv_cache.shape[4]
    lens = context_lens.to(device=device, dtype=torch.long)
    blocks = (lens + block_size - 1).div(block_size, rounding_mode="floor")
    counts = blocks.tolist()
    if max(counts, default=0) == 0:  # no context: nothing to attend to, zeros like CUDA
        return torch.zeros_like(query)
    chunks = decode_chunks(tuple(sorted(counts, reverse=True)), block_size)
    single = len(chunks) == 1 and chunks[0][0] == num_seqs  # every row in one chunk: no reordering
    tables = block_tables.to(device)
    if not single:  # longest first, so that the rows of every chunk come first
        order = torch.sort(lens, descending=True, stable=True).indices
        lens, blocks, tables, query = lens[order], blocks[order], tables[order], query[order.to(query.device)]
    num_blocks, group = chunks[-1][2], num_heads // num_kv_heads
    # Table entries past a row's last block are padding: read block 0, mask it out.
    tables = tables[:, :num_blocks].long()
    block_index = torch.arange(num_blocks, device=device)
    read = block_index < blocks.unsqueeze(1)
    keys = torch.arange(num_blocks * block_size, device=device)
    hidden = keys >= lens.unsqueeze(1)  # [B, keys]
    if window > 0:  # blocks wholly before the window are not read; keys before it are hidden
        first = (lens - window).clamp(min=0)
        read &= block_index >= first.div(block_size, rounding_mode="floor").unsqueeze(1)
        hidden |= keys < first.unsqueeze(1)
    tables = torch.where(read, tables, 0)
    dtype = _compute_dtype(kv_cache.dtype)
    # Batch over (KV head, row); the query heads of a KV head's group are its query rows.
    q = query.to(device=device, dtype=dtype).view(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1)
    source = kv_cache[:, layer].permute(1, 3, 0, 2, 4)  # [2, Hkv, blocks, block_size, D], a view
    scores = None if single else torch.full((num_kv_heads, num_seqs, group, num_blocks * block_size),
                                            float("-inf"), dtype=dtype, device=device)
    values = []
    for n, b0, b1 in chunks:
        k0, k1 = b0 * block_size, b1 * block_size
        # One gather straight into [2 (K, V), Hkv, n, keys, D]: each (head, row) pair's keys
        # are contiguous, the layout the batched matmuls want.
        kv = torch.index_select(source, 2, tables[:n, b0:b1].reshape(-1)).to(dtype)
        kv = kv.view(2, num_kv_heads * n, k1 - k0, head_dim)
        s = torch.bmm(q[:, :n].reshape(num_kv_heads * n, group, head_dim), kv[0].transpose(1, 2))
        s = s.view(num_kv_heads, n, group, k1 - k0).mul_(scale)
        s.masked_fill_(hidden[None, :n, None, k0:k1], float("-inf"))
        if single:
            scores = s
        else:
            scores[:, :n, :, k0:k1] = s
        values.append(kv[1])
    probs = torch.softmax(scores, dim=-1)
    out = torch.zeros((num_kv_heads, num_seqs, group, head_dim), dtype=dtype, device=device)
    for (n, b0, b1), v in zip(chunks, values):
        p = probs[:, :n, :, b0 * block_size:b1 * block_size].reshape(num_kv_heads * n, group, -1)
        out[:, :n] += torch.bmm(p, v).view(num_kv_heads, n, group, head_dim)
    out = out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)
    if not single:
        out = torch.empty_like(out).index_copy_(0, order, out)
    return out.to(query.dtype)


def paged_attention_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention for a ragged batch whose new K/V are already in the cache.

    Sequence s owns query rows query_start_loc[s]:query_start_loc[s+1] at positions
    context_lens[s] - q_len .. context_lens[s] - 1; position p sees positions 0..p (with
    window > 0: p - window + 1 .. p).
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    ctxs = context_lens.tolist()
    device, block_size = kv_cache.device, kv_cache.shape[3]
    single: list[int] = []  # sequences with one new token: batched through decode
    for s, ctx in enumerate(ctxs):
        q_len = starts[s + 1] - starts[s]
        if q_len == 0:
            continue
        if q_len > ctx:
            raise ValueError(f"sequence {s}: {q_len} new tokens but context length {ctx}")
        if q_len == 1:
            single.append(s)
            continue
        # The first row's window starts first; blocks wholly before it are not read.
        first_block = max(0, ctx - q_len + 1 - window) // block_size if window > 0 else 0
        first = first_block * block_size
        num_blocks = -(-ctx // block_size)
        tables = block_tables[s, first_block:num_blocks].to(device=device, dtype=torch.long)
        k, v = _gather_kv(kv_cache, layer, tables)  # [(num_blocks - first_block) * block_size, Hkv, D]
        k, v = k[:ctx - first].transpose(0, 1).unsqueeze(0), v[:ctx - first].transpose(0, 1).unsqueeze(0)
        q = query[starts[s] : starts[s + 1]].to(device).transpose(0, 1).unsqueeze(0)
        if q_len == ctx and window <= 0:  # nothing cached before: plain causal (top-left aligned)
            o = _sdpa(q, k, v, None, scale, causal=True)
        else:  # query i sits at position ctx - q_len + i
            pos = torch.arange(ctx - q_len, ctx, device=device)
            key_pos = torch.arange(first, ctx, device=device)
            mask = key_pos[None, :] <= pos[:, None]
            if window > 0:
                mask &= key_pos[None, :] > pos[:, None] - window
            o = _sdpa(q, k, v, mask, scale)
        out[starts[s] : starts[s + 1]] = o[0].transpose(0, 1).to(out.dtype)
    if single:
        idx = torch.tensor(single, device=block_tables.device)
        rows = torch.tensor([starts[s] for s in single], device=query.device)
        out[rows] = paged_attention_decode(
            query[rows], kv_cache, layer, block_tables[idx], context_lens[idx.to(context_lens.device)], scale,
            window,
        ).to(out.device)
    return out


def copy_blocks(kv_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """Copy-on-write: block src_dst[i, 0] (all layers, K and V) onto block src_dst[i, 1]."""
    if src_dst.numel() == 0:
        return
    pairs = src_dst.to(device=kv_cache.device, dtype=torch.long)
    # Gather first, then scatter: every source is read before any destination is written.
    kv_cache.index_copy_(0, pairs[:, 1], kv_cache.index_select(0, pairs[:, 0]))


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """Block src_dst[i, 0] of src_cache goes to block src_dst[i, 1] of dst_cache.

    Batched: one gather into a staging tensor, (at most) one transfer, one scatter.
    """
    if src_cache.shape[1:] != dst_cache.shape[1:] or src_cache.dtype != dst_cache.dtype:
        raise ValueError(
            f"swap between incompatible pools {tuple(src_cache.shape)}/{src_cache.dtype} "
            f"and {tuple(dst_cache.shape)}/{dst_cache.dtype}"
        )
    if src_dst.numel() == 0:
        return
    src_idx = src_dst[:, 0].to(device=src_cache.device, dtype=torch.long)
    dst_idx = src_dst[:, 1].to(device=dst_cache.device, dtype=torch.long)
    staging = src_cache.index_select(0, src_idx)
    dst_cache.index_copy_(0, dst_idx, staging.to(dst_cache.device))
