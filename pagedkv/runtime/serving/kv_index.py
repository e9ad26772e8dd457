"""One engine's KV blocks per tier, as its KV events tell them (docs/protocol.md, "KV events"):
what a router needs to know which engine holds a prompt's prefix. Torch-free.

Batches are applied in sequence order. A batch that does not follow the last one applied (a gap:
the subscriber joined late or dropped messages), or that comes from another instance of the
engine (it restarted), makes the index stale: the caller takes a snapshot (`kv_state`), loads
it, and the batches after the snapshot's sequence number apply again; those up to it are
skipped.
"""
from __future__ import annotations

from collections.abc import Iterable

import msgpack

TOPIC = b"kv-events"


def decode_batch(frames: list[bytes]) -> dict:
    """The batch in a KV events message (topic, sequence number, msgpack map)."""
    if len(frames) != 3 or frames[0] != TOPIC:
        raise ValueError("not a KV events message")
    batch = msgpack.unpackb(frames[2], raw=False)
    if not isinstance(batch, dict) or batch.get("seq") != int.from_bytes(frames[1], "big"):
        raise ValueError("a KV events message whose sequence numbers disagree")
    return batch


class KVIndex:
    def __init__(self) -> None:
        self.engine: str | None = None
        self.seq: int | None = None  # the last batch applied; None: stale, a snapshot is needed
        self.block_size: int | None = None
        self.tiers: dict[str, set[bytes]] = {}
        self.gaps = 0

    @property
    def stale(self) -> bool:
        return self.seq is None

    def apply(self, batch: dict) -> bool:
        """Applies a batch; False if it cannot follow what the index holds (a snapshot is needed)."""
        seq, engine = batch["seq"], batch["engine"]
        if self.seq is not None and engine == self.engine and seq <= self.seq:
            return True  # already in the snapshot
        fresh_start = seq == 1  # the first batch clears every tier and stores what they held
        if not fresh_start and (self.seq is None or engine != self.engine or seq != self.seq + 1):
            if self.seq is not None:
                self.gaps += 1
            self.seq = None
            return False
        self.engine, self.seq, self.block_size = engine, seq, batch.get("block_size", self.block_size)
        for event in batch["events"]:
            held = self.tiers.setdefault(event["tier"], set())
            if event["type"] == "cleared":
                held.clear()
            elif event["type"] == "stored":
                held.update(event["hashes"])
            elif event["type"] == "removed":
                held.difference_update(event["hashes"])
        return True

    def load(self, state: dict) -> None:
        """A snapshot (`kv_state`): every tier's blocks after batch state["seq"]."""
        self.engine, self.seq, self.block_size = state["engine"], state["seq"], state["block_size"]
        self.tiers = {tier: set(hashes) for tier, hashes in state["tiers"].items()}

    def prefix_blocks(self, hashes: Iterable[bytes], tiers: Iterable[str] = ("device", "host")) -> int:
        """How many leading blocks of a prompt's chain one of `tiers` holds."""
        held = [self.tiers.get(t, set()) for t in tiers]
        count = 0
        for block_hash in hashes:
            if not any(block_hash in h for h in held):
                break
            count += 1
        return count


def prompt_hashes(tokenizer, source: dict, block_size: int) -> list[bytes]:
    """The chained hashes of an engine request's full prompt blocks, as the engine computes them
    (pagedkv/kvcache/block_hash.py): its prompt tokenized as the server tokenizes it (a chat
    rendered with the model's template and a generation prompt)."""
    from pagedkv.kvcache.block_hash import ROOT, block_hash

    if source.get("prompt_ids") is not None:
        ids = list(source["prompt_ids"])
    elif tokenizer is None:
        return []
    elif source.get("prompt") is not None:
        ids = tokenizer.encode(source["prompt"])
    else:
        ids = tokenizer.encode(tokenizer.apply_chat_template(source["messages"], add_generation_prompt=True),
                               add_special_tokens=False)
    hashes: list[bytes] = []
    parent = ROOT
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = block_hash(parent, tuple(ids[start:start + block_size]))
        hashes.append(parent)
    return hashes


def load_tokenizer(model: str):
    """The model's tokenizer (a Hugging Face folder's tokenizer.json, or a GGUF file's), or None."""
    import os

    from pagedkv.runtime.models.tokenizer import Tokenizer

    try:
        if os.path.isdir(model):
            return Tokenizer.from_folder(model)
        if model.endswith(".gguf"):
            from gguf import GGUFReader

            return Tokenizer.from_gguf(GGUFReader(model), model)
    except Exception:
        return None
    return None
