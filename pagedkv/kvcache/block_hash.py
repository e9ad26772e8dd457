"""Content hashes of full blocks, chained: a block's hash covers its tokens and every token
before them, so equal hashes mean equal prefixes (and equal K/V) up to the block's end."""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator

from pagedkv.kvcache.sequence import PENDING_TOKEN, Sequence

ROOT = b""  # the parent hash of a sequence's first block


def block_hash(parent: bytes, token_ids: tuple[int, ...] | list[int]) -> bytes:
    """SHA-256 of the parent's hash and the block's token ids (stable across processes)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def parent_hash(seq: Sequence, index: int) -> bytes:
    """The hash of the block before block `index` of the sequence (ROOT for the first)."""
    return seq.block_hashes[index - 1] if index else ROOT


def full_blocks(seq: Sequence, start: int, stop: int, block_size: int) -> Iterator[tuple[bytes, tuple[int, ...]]]:
    """(hash, token ids) of the sequence's full blocks start..stop-1.

    The hashes are kept on the sequence and extended as it grows: tokens are only ever
    appended, so a full block's hash never changes, and a sequence preempted by recompute
    keeps them.
    """
    hashes, ids = seq.block_hashes, seq.token_ids
    for index in range(min(start, len(hashes)), stop):
        tokens = tuple(ids[index * block_size:(index + 1) * block_size])
        if index == len(hashes):
            if PENDING_TOKEN in tokens:
                raise ValueError(f"sequence {seq.seq_id}: block {index} holds a token not sampled yet")
            hashes.append(block_hash(hashes[-1] if hashes else ROOT, tokens))
        if index >= start:
            yield hashes[index], tokens

