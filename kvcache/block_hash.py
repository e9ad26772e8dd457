"""Content hashes of full blocks, chained: a block's hash covers its tokens and every token
before them, so equal hashes mean equal prefixes (and equal K/V) up to the block's end."""
from __future__ import annotations

import hashlib
from array import array

from kvcache.sequence import Sequence

ROOT = b""  # the parent hash of a sequence's first block


def block_hash(parent: bytes, token_ids: tuple[int, ...] | list[int]) -> bytes:
    """SHA-256 of the parent's hash and the block's token ids (stable across processes)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def block_tokens(seq: Sequence, index: int, block_size: int) -> tuple[int, ...]:
    return tuple(seq.token_ids[index * block_size:(index + 1) * block_size])


def full_block_hashes(seq: Sequence, num_blocks: int, block_size: int) -> list[bytes]:
    """The hashes of the sequence's first `num_blocks` blocks, which must be full.

    They are kept on the sequence and extended as it grows: tokens are only ever appended, so
    a full block's hash never changes, and a sequence preempted by recompute keeps them.
    """
    hashes = seq.block_hashes
    while len(hashes) < num_blocks:
        parent = hashes[-1] if hashes else ROOT
        hashes.append(block_hash(parent, block_tokens(seq, len(hashes), block_size)))
    return hashes
