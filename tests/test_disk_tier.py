"""The disk tier alone, with fake payloads: writes become visible once complete, a restart finds
every block, damaged, truncated and foreign files are misses (and are removed), a full disk
stops writes with one warning, the least recently used block leaves first (a prefix's tail
before its head), a block being read is never evicted, and two tiers on one directory share it."""
import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pagedkv.kvcache.block_hash import ROOT, block_hash
from pagedkv.kvcache.disk_tier import BlockFileError, DiskTier, decode_block, encode_block

FINGERPRINT = "f" * 64
PAYLOAD = 256


PARENTS: dict[bytes, bytes] = {}


def chain(n: int, salt: int = 0) -> list[tuple[bytes, tuple[int, ...]]]:
    """n chained blocks (hash, tokens) of 4 tokens each."""
    out, parent = [], ROOT
    for i in range(n):
        tokens = (salt, i, i + 1, i + 2)
        h = block_hash(parent, tokens)
        PARENTS[h] = parent
        out.append((h, tokens))
        parent = h
    return out


def payload(block: bytes) -> bytes:
    return (block * (PAYLOAD // len(block) + 1))[:PAYLOAD]


def store_all(tier: DiskTier, blocks) -> None:
    for h, tokens in blocks:
        tier.prepare_store(h, tokens, payload(h), PARENTS[h])
    tier.wait_idle()
    tier.poll()


def load_all(tier: DiskTier, blocks) -> dict[bytes, bytes | None]:
    tier.prepare_load(blocks)
    tier.wait_idle()
    return {loaded.block_hash: loaded.payload for loaded in tier.poll()}


@pytest.fixture
def tier(tmp_path):
    t = DiskTier(tmp_path, 1 << 20, FINGERPRINT, block_bytes=PAYLOAD)
    yield t
    t.close()


def test_encode_and_decode_refuse_what_is_not_the_block():
    h, tokens = chain(1)[0]
    data = encode_block(FINGERPRINT, h, tokens, b"x" * 10)
    assert decode_block(data, FINGERPRINT, h, tokens)[0] == b"x" * 10
    for bad, why in [(data[:-1], "truncated"), (data[:5], "truncated"), (data[:-1] + b"y", "checksum"),
                     (b"JUNK" + data[4:], "not a block file")]:
        with pytest.raises(BlockFileError, match=why):
            decode_block(bad, FINGERPRINT, h, tokens)
    with pytest.raises(BlockFileError, match="another model"):
        decode_block(data, "0" * 64, h, tokens)
    with pytest.raises(BlockFileError, match="another block"):
        decode_block(data, FINGERPRINT, chain(2)[1][0], tokens)
    with pytest.raises(BlockFileError, match="tokens differ"):
        decode_block(data, FINGERPRINT, h, (9, 9, 9, 9))


def test_a_write_is_visible_once_complete_and_reads_back(tier):
    blocks = chain(3)
    h, tokens = blocks[0]
    tier.prepare_store(h, tokens, payload(h), ROOT)
    assert h not in tier  # not in the index before poll has seen the write complete
    tier.wait_idle()
    tier.poll()
    assert tier.lookup([h]) == 1 and tier.stats.stored_blocks == 1
    store_all(tier, blocks[1:])
    assert tier.lookup([b for b, _ in blocks]) == 3
    assert tier.lookup([blocks[0][0], chain(3, salt=1)[1][0], blocks[2][0]]) == 1  # leading blocks only
    got = load_all(tier, blocks)
    assert got == {h: payload(h) for h, _ in blocks}
    assert tier.stats.loaded_bytes == 3 * PAYLOAD
    assert not list(tier.folder.rglob("*.tmp"))


def test_a_restart_finds_every_block(tmp_path):
    blocks = chain(5)
    first = DiskTier(tmp_path, 1 << 20, FINGERPRINT)
    store_all(first, blocks)
    first.close()
    second = DiskTier(tmp_path, 1 << 20, FINGERPRINT)
    assert second.num_blocks == 5 and second.lookup([h for h, _ in blocks]) == 5
    assert load_all(second, blocks) == {h: payload(h) for h, _ in blocks}
    other_model = DiskTier(tmp_path, 1 << 20, "0" * 64)
    assert other_model.num_blocks == 0 and other_model.lookup([blocks[0][0]]) == 0
    for t in (second, other_model):
        t.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign", "other_block"])
def test_a_damaged_or_foreign_file_is_a_miss_and_is_removed(tier, tmp_path, damage):
    blocks = chain(3)
    store_all(tier, blocks)
    victim = tier.path(blocks[1][0])
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "foreign":  # the same block of another model, copied into this model's folder
        victim.write_bytes(encode_block("0" * 64, blocks[1][0], blocks[1][1], payload(blocks[1][0])))
    else:  # another block's file under this block's name
        victim.write_bytes(tier.path(blocks[2][0]).read_bytes())
    got = load_all(tier, blocks)
    assert got[blocks[0][0]] == payload(blocks[0][0]) and got[blocks[2][0]] == payload(blocks[2][0])
    assert got[blocks[1][0]] is None
    assert tier.stats.errors == 1 and blocks[1][0] not in tier
    tier.wait_idle()
    assert not victim.exists()


def test_a_payload_of_another_size_is_a_miss(tier):
    (h, tokens), = chain(1)
    tier.prepare_store(h, tokens, b"short", ROOT)
    tier.wait_idle()
    tier.poll()
    assert load_all(tier, [(h, tokens)]) == {h: None}


def file_size(h: bytes, tokens: tuple[int, ...]) -> int:
    return len(encode_block(FINGERPRINT, h, tokens, payload(h), PARENTS[h]))


def test_the_least_recently_used_block_leaves_first_tail_before_head(tmp_path):
    a, b = chain(2, salt=1), chain(2, salt=2)
    tier = DiskTier(tmp_path, sum(file_size(*x) for x in a + b) + 10, FINGERPRINT)
    store_all(tier, a + b)
    tier.touch([h for h, _ in a])  # a used again: b is older; b's tail goes before its head
    store_all(tier, chain(1, salt=3))
    assert b[1][0] not in tier and b[0][0] in tier and all(h in tier for h, _ in a)
    store_all(tier, chain(1, salt=4))
    assert b[0][0] not in tier and tier.stats.evicted_blocks == 2
    assert tier.used_bytes <= tier.capacity_bytes and len(list(tier.folder.rglob("*.kvb"))) == 4
    tier.close()


def test_a_prefix_stored_tail_first_still_leaves_tail_first(tmp_path):
    """Demotions come tail first (the device frees a prefix's tail first): a block stored before
    its parent still keeps the parent from being evicted before it."""
    a = chain(3, salt=1)
    tier = DiskTier(tmp_path, sum(file_size(*x) for x in a) + 10, FINGERPRINT)
    store_all(tier, list(reversed(a)))
    tier.touch([h for h, _ in a])
    for i in range(3):
        store_all(tier, chain(1, salt=10 + i))
        assert [h in tier for h, _ in a] == [True] * (2 - i) + [False] * (i + 1)  # tail, then middle, then head
    tier.close()


def test_a_block_being_read_is_not_evicted(tmp_path):
    a = chain(2, salt=1)
    tier = DiskTier(tmp_path, sum(file_size(*x) for x in a) + 10, FINGERPRINT)
    store_all(tier, a)
    tier._io.submit(__import__("time").sleep, 0.3)  # keep the read queued behind this
    tier.prepare_load(a[:1])
    tier.prepare_store(*chain(1, salt=2)[0], payload(b"z"), ROOT)
    assert a[0][0] in tier and a[1][0] not in tier  # the pinned head stayed, the tail made room
    tier.wait_idle()
    assert tier.poll()[0].payload == payload(a[0][0])
    tier.close()


def test_a_full_disk_stops_writes_with_one_warning_and_keeps_serving(tier, monkeypatch, caplog):
    blocks = chain(4)
    store_all(tier, blocks[:2])
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    with caplog.at_level(logging.WARNING, logger="pagedkv.kvcache.disk_tier"):
        store_all(tier, blocks[2:3])
        store_all(tier, blocks[3:])
    monkeypatch.undo()
    assert [r.message for r in caplog.records if "full" in r.message] and len(caplog.records) == 1
    assert not tier.wants(blocks[3][0]) and tier.stats.dropped_stores == 1
    assert load_all(tier, blocks[:2]) == {h: payload(h) for h, _ in blocks[:2]}
    assert not list(tier.folder.rglob("*.tmp"))


def test_two_tiers_on_one_directory_share_it(tmp_path):
    first, second = DiskTier(tmp_path, 1 << 20, FINGERPRINT), DiskTier(tmp_path, 1 << 20, FINGERPRINT)
    blocks = chain(3)
    store_all(first, blocks)
    assert second.lookup([h for h, _ in blocks]) == 3  # written after second started: found by a stat
    assert load_all(second, blocks) == {h: payload(h) for h, _ in blocks}
    first.path(blocks[2][0]).unlink()  # the other engine evicted it meanwhile
    assert load_all(second, blocks[2:]) == {blocks[2][0]: None}
    for t in (first, second):
        t.close()


def test_two_processes_writing_the_same_blocks_leave_whole_files(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_disk_tier import chain, payload, store_all, FINGERPRINT
        from pagedkv.kvcache.disk_tier import DiskTier
        t = DiskTier({str(tmp_path)!r}, 1 << 24, FINGERPRINT)
        for _ in range(20):
            store_all(t, chain(30))
            for h, _ in chain(30):
                if h in t:
                    t._forget(h)
        t.close()
        """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**os.environ}) for _ in range(2)]
    assert all(p.wait(120) == 0 for p in procs)
    tier = DiskTier(tmp_path, 1 << 24, FINGERPRINT)
    assert load_all(tier, chain(30)) == {h: payload(h) for h, _ in chain(30)}
    assert not list(tier.folder.rglob("*.tmp"))
    tier.close()
