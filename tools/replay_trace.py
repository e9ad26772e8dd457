"""Replays a request trace against the block manager alone (no model, no executor) and prints
the share of prompt tokens each KV tier serves, for given tier sizes, beside an unbounded
cache's.

    python -m tools.replay_trace TRACE.jsonl [--config DEVICE,HOST,DISK ...] [--block-size 16]
                                 [--trace-block 512] [--concurrency 1] [--prompts-only]
                                 [--store disk|memory] [--out DIR] [--update-docs]
    python -m tools.replay_trace --generate TRACE.jsonl [--seed 0]   # a synthetic trace
    python -m tools.replay_trace --generate-chat TRACE.jsonl [--conversations 24 --turns 8 --clients 2]

The trace is in the format Mooncake publishes: one JSON object a line with `timestamp` (ms),
`input_length`, `output_length` and `hash_ids`, the ids of the prompt's blocks of
`--trace-block` tokens (512 in Mooncake's traces); two requests that share an id share that
block and everything before it. Each id stands for a deterministic block of token ids; the
last block is cut to the input length.

Each --config is a device pool, a host tier and a store tier below it, in blocks of
--block-size tokens (0: no such tier). The block manager is pagedkv's own
(pagedkv.kvcache.block_manager.BlockManager), with host caching in its CPU pool and the store
tier a DiskTier in a temporary folder (`--store disk`, the default: real files of a small
payload, so that its eviction and index are the real ones) or an in-memory stand-in with the
same interface (`--store memory`, faster). Only the bookkeeping of the tier operations is
carried out: stores hand the store tier a payload of zeros, loads are read back and their
completion is awaited; nothing is computed.

Requests run in timestamp order. Each is admitted (its cached prefix looked up on the
device, then below it), its prompt is marked computed and offered to the prefix cache, its
output tokens (distinct random ids; `--prompts-only` leaves them out) take their blocks, and
it lets go of its blocks once `--concurrency` later requests have been admitted (or sooner,
when the device pool needs the room), as a request that finishes in that order would.

Hit ratio: prompt tokens found cached on a request's admission, over all prompt tokens; the
block of a prompt's last token never counts (the engine computes that token for its logits),
so even an unbounded cache stays below 100%. Per tier: which tier held them.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish
from pagedkv.kvcache.allocator import Device
from pagedkv.kvcache.block_manager import AllocStatus, BlockManager
from pagedkv.kvcache.disk_tier import DiskTier, Loaded, TierStats, encode_block
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, SequenceStatus, next_seq_id

TITLE = "KV tiers: trace replay on the block manager"
TOKEN_LOW, TOKEN_HIGH = 10_000, 99_999  # ids of one width: every block file has the same size
FINGERPRINT = "trace-replay".ljust(64, "0")


# -- traces ------------------------------------------------------------------------------------
@dataclass
class TraceRequest:
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def read_trace(path: str | Path) -> list[TraceRequest]:
    requests = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                requests.append(TraceRequest(float(item.get("timestamp", 0)), int(item["input_length"]),
                                             int(item.get("output_length", 0)), [int(h) for h in item["hash_ids"]]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a trace line ({e})") from None
    return requests


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps({"timestamp": r.timestamp, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": r.hash_ids}) + "\n")


def block_tokens(hash_id: int, trace_block: int) -> list[int]:
    """The token ids that trace block `hash_id` stands for (the same in every run)."""
    return random.Random(hash_id * 1_000_003 + trace_block).choices(range(TOKEN_LOW, TOKEN_HIGH + 1), k=trace_block)


def prompt_tokens(request: TraceRequest, trace_block: int, index: int) -> list[int]:
    """The request's prompt: its blocks' tokens, cut to its input length (tokens of its own
    after the blocks, where the trace names too few for its length)."""
    tokens = [t for h in request.hash_ids for t in block_tokens(h, trace_block)][: request.input_length]
    if len(tokens) < request.input_length:
        rng = random.Random(f"request-{index}")
        tokens += rng.choices(range(TOKEN_LOW, TOKEN_HIGH + 1), k=request.input_length - len(tokens))
    return tokens


def synthetic_trace(num_groups: int = 6, requests_per_group: int = 12, shared_blocks: tuple[int, int] = (1, 4),
                    own_blocks: tuple[int, int] = (0, 3), turns: int = 3, trace_block: int = 512,
                    output_length: tuple[int, int] = (16, 128), seed: int = 0) -> list[TraceRequest]:
    """Requests with shared prefixes: groups of requests behind one shared head (a system prompt
    or a document), each with blocks of its own after it, and some continued as multi-turn
    sessions whose every turn repeats the one before and adds blocks. Requests of different
    groups interleave at random; timestamps grow by a random gap."""
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    sessions: list[list[list[int]]] = []  # each: the hash ids of its turns, in order
    for _ in range(num_groups):
        head = fresh(rng.randint(*shared_blocks))
        for _ in range(requests_per_group):
            turn = head + fresh(rng.randint(*own_blocks))
            chain = [turn]
            for _ in range(rng.randint(1, turns) - 1):
                turn = turn + fresh(rng.randint(1, 2))
                chain.append(turn)
            sessions.append(chain)
    # Interleave: a session's turns keep their order, sessions mix at random.
    order = [i for i, chain in enumerate(sessions) for _ in chain]
    rng.shuffle(order)
    position = [0] * len(sessions)
    requests, t = [], 0.0
    for i in order:
        ids = sessions[i][position[i]]
        position[i] += 1
        cut = rng.randint(1, trace_block)  # the last block is partly filled
        requests.append(TraceRequest(t, (len(ids) - 1) * trace_block + cut, rng.randint(*output_length), ids))
        t += round(rng.expovariate(1 / 500.0))
    return requests


# -- a store tier in memory --------------------------------------------------------------------
class MemoryStore:
    """A stand-in for DiskTier with its interface and its documented eviction (the least recently
    used block that no held block continues goes first; blocks being read are pinned), holding
    `capacity_blocks` blocks in a dict; stores and reads complete at the next `poll`. A block's
    continuations are counted by parent hash whether or not the parent is held (a prefix is
    usually stored tail first: the device evicts it in that order)."""

    name = "disk"
    write_through = False

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.stats = TierStats()
        self._index: OrderedDict[bytes, list] = OrderedDict()  # hash -> [parent, pins], least recent first
        self._children: Counter[bytes] = Counter()  # parent hash -> held blocks that continue it
        self._done: list[Loaded] = []
        self._stored: list[tuple[bytes, bytes]] = []

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def _add(self, block_hash: bytes, parent: bytes) -> None:
        self._index[block_hash] = [parent, 0]
        self._children[parent] += 1

    def _forget(self, block_hash: bytes) -> None:
        parent = self._index.pop(block_hash)[0]
        self._children[parent] -= 1

    def lookup(self, hashes: list[bytes], parent: bytes = b"") -> int:
        held = 0
        for block_hash in hashes:
            if block_hash not in self._index:
                break
            held += 1
        return held

    def prepare_load(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        for block_hash, _ in blocks:
            self._index[block_hash][1] += 1
        for block_hash, _ in reversed(blocks):
            self._index.move_to_end(block_hash)
        self._done += [Loaded(block_hash, b"", {}, 0.0) for block_hash, _ in blocks]

    def wants(self, block_hash: bytes) -> bool:
        return block_hash not in self._index and all(block_hash != h for h, _ in self._stored)

    def prepare_store(self, block_hash: bytes, token_ids, payload: bytes, parent: bytes = b"",
                      extra: dict | None = None) -> list[bytes]:
        if not self.wants(block_hash):
            return []
        evicted = []
        while len(self._index) + len(self._stored) >= self.capacity_blocks:
            victim = next((h for h, (_, pins) in self._index.items() if not pins and not self._children[h]), None)
            if victim is None:
                break
            self._forget(victim)
            evicted.append(victim)
        self.stats.evicted_blocks += len(evicted)
        if len(self._index) + len(self._stored) >= self.capacity_blocks:
            self.stats.dropped_stores += 1
            return evicted
        self._stored.append((block_hash, parent))
        return evicted

    def poll(self) -> list[Loaded]:
        for block_hash, parent in self._stored:
            self._add(block_hash, parent)
            self.stats.stored_blocks += 1
        self._stored.clear()
        done, self._done = self._done, []
        for loaded in done:
            self._index[loaded.block_hash][1] -= 1
        return done

    def describe(self) -> dict:
        return {**self.stats.as_dict(), "cached_blocks": self.num_blocks, "capacity_blocks": self.capacity_blocks}

    def wait_idle(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


# -- the replay ----------------------------------------------------------------------------------
@dataclass
class TierConfig:
    device_blocks: int
    host_blocks: int = 0
    disk_blocks: int = 0

    @classmethod
    def parse(cls, text: str) -> "TierConfig":
        parts = [int(x) for x in text.split(",")]
        if not 1 <= len(parts) <= 3 or parts[0] < 1 or any(p < 0 for p in parts):
            raise argparse.ArgumentTypeError(f"a config is DEVICE[,HOST[,DISK]] blocks, DEVICE >= 1; got {text!r}")
        return cls(*parts)

    def label(self) -> str:
        return f"{self.device_blocks},{self.host_blocks},{self.disk_blocks}"


@dataclass
class Result:
    config: str                  # "device,host,disk" blocks, or "unbounded"
    device_blocks: int
    host_blocks: int
    disk_blocks: int
    requests: int                # requests run
    skipped: int                 # requests whose prompt alone exceeds the device pool (all misses)
    prompt_tokens: int           # of every request, run or skipped
    hit_tokens: dict[str, int] = field(default_factory=dict)  # per tier: device, host, disk
    tier_stats: dict = field(default_factory=dict)

    @property
    def total_hit_tokens(self) -> int:
        return sum(self.hit_tokens.values())

    def ratio(self, tier: str | None = None) -> float:
        hit = self.total_hit_tokens if tier is None else self.hit_tokens.get(tier, 0)
        return hit / self.prompt_tokens if self.prompt_tokens else 0.0


class Replay:
    def __init__(self, config: TierConfig, block_size: int, store: str = "disk", payload_bytes: int = 64,
                 concurrency: int = 1, prompts_only: bool = False, folder: Path | None = None) -> None:
        self.config, self.block_size = config, block_size
        self.concurrency, self.prompts_only = max(concurrency, 1), prompts_only
        self.payload = bytes(payload_bytes)  # what a store tier is handed: nothing is computed
        self.store = None
        self.folder = None
        if config.disk_blocks:
            if store == "memory":
                self.store = MemoryStore(config.disk_blocks)
            else:
                self.folder = Path(tempfile.mkdtemp(prefix="pagedkv-replay-", dir=folder))
                self.store = DiskTier(self.folder, config.disk_blocks * self._file_bytes(), FINGERPRINT,
                                      block_bytes=payload_bytes)
        self.bm = BlockManager(block_size, config.device_blocks, config.host_blocks, watermark=0.0,
                               enable_prefix_caching=True, host_caching=config.host_blocks > 0,
                               stores=[self.store] if self.store else [], block_bytes=payload_bytes)
        self.window: deque[SequenceGroup] = deque()
        self.rng = random.Random(0)

    def _file_bytes(self) -> int:
        """One block file's size (every file has it: token ids of one width, and `_pad` for a
        prefix's first block, whose parent field is empty)."""
        return len(encode_block(FINGERPRINT, bytes(32), (TOKEN_LOW,) * self.block_size, self.payload,
                                bytes(32)))

    def _pad(self, parent: bytes) -> dict | None:
        if parent:
            return None
        short = len(encode_block(FINGERPRINT, bytes(32), (TOKEN_LOW,) * self.block_size, self.payload, b""))
        return {"pad": "0" * (self._file_bytes() - short - len(',"pad":""'))}

    # -- the tier operations' bookkeeping --------------------------------------------------------
    def _apply(self) -> None:
        ops = self.bm.take_tier_ops()
        for op in ops.stores:  # demotions, host loads and loads move bytes only: nothing to do here
            self.store.prepare_store(op.entry.block_hash, op.entry.token_ids, self.payload, op.entry.parent,
                                     self._pad(op.entry.parent))

    def _step(self) -> None:
        """Between two steps: the store tier's work finishes, the last step's pins go."""
        if self.store is not None:
            self.store.wait_idle()
        self.bm.begin_step()
        self._apply()

    def _finish(self, group: SequenceGroup) -> None:
        seq = group.seqs[0]
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED_LENGTH

    def _finish_oldest(self) -> bool:
        if not self.window:
            return False
        self._finish(self.window.popleft())
        return True

    def _hits(self) -> dict[str, int]:
        tiers = self.bm.tiers
        out = {"host": tiers.host_stats.hit_blocks}
        if self.store is not None:
            out["disk"] = self.store.stats.hit_blocks
        return out

    def request(self, prompt: list[int], output_length: int) -> dict[str, int] | None:
        """Runs one request; its hit tokens per tier, or None if its prompt cannot fit."""
        self._step()
        while len(self.window) >= self.concurrency:
            self._finish_oldest()
        seq = Sequence(next_seq_id(), list(prompt), len(prompt))
        group = SequenceGroup(f"r{seq.seq_id}", [seq])
        while True:
            status = self.bm.can_allocate(group)
            if status is AllocStatus.NEVER:
                return None
            if status is AllocStatus.OK or not self._finish_oldest():
                break
            self._step()  # pins of the last admission go once its copies are done
        if status is not AllocStatus.OK:
            return None
        before = self._hits()
        alloc = self.bm.allocate(group)
        after = self._hits()
        self._apply()
        bs = self.bm.block_size
        host = (after["host"] - before["host"]) * bs
        hits = {"device": alloc.computed_tokens[0] - host, "host": host, "disk": 0}
        seq.num_computed_tokens = alloc.computed_tokens[0]
        seq.status = SequenceStatus.RUNNING
        if alloc.loading:
            while self.bm.is_loading(group):
                self._step()
            loaded = self.bm.finish_loads(group) - seq.num_computed_tokens
            hits["disk"] = loaded
            seq.num_computed_tokens += loaded
            self._apply()
        # The prompt is computed: its full blocks join the prefix cache.
        seq.num_computed_tokens = len(seq)
        self.bm.cache_computed(seq)
        if output_length and not self.prompts_only:
            seq.token_ids += self.rng.choices(range(TOKEN_LOW, TOKEN_HIGH + 1), k=output_length)
            while not self.bm.can_append_slots(group) and self._finish_oldest():
                pass
            if self.bm.can_append_slots(group):
                self.bm.append_slots(seq)
                self._apply()
                seq.num_computed_tokens = len(seq) - 1  # the last token's K/V is never written
            else:  # alone, it cannot grow that long here: it ends with its prompt
                del seq.token_ids[len(prompt):]
        self.window.append(group)
        return hits

    def drain(self) -> None:
        while self._finish_oldest():
            pass
        self._step()

    def close(self) -> None:
        if isinstance(self.store, DiskTier):
            self.store.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def unbounded_blocks(requests: list[TraceRequest], block_size: int, trace_block: int, concurrency: int) -> int:
    """A device pool that never evicts: every distinct trace block's blocks, every request's
    output blocks, and room for the requests in flight."""
    per_trace_block = -(-trace_block // block_size)
    distinct = len({h for r in requests for h in r.hash_ids})
    outputs = sum(-(-r.output_length // block_size) + 2 for r in requests)
    longest = max((-(-(r.input_length + r.output_length) // block_size) + 1 for r in requests), default=1)
    return distinct * per_trace_block + outputs + concurrency * longest + len(requests)


def replay(requests: list[TraceRequest], config: TierConfig | None, block_size: int = 16, trace_block: int = 512,
           store: str = "disk", concurrency: int = 1, prompts_only: bool = False,
           payload_bytes: int = 64) -> Result:
    """The trace through one tier configuration (None: an unbounded device pool)."""
    unbounded = config is None
    if unbounded:
        config = TierConfig(unbounded_blocks(requests, block_size, trace_block, concurrency))
    run = Replay(config, block_size, store, payload_bytes, concurrency, prompts_only)
    result = Result("unbounded" if unbounded else config.label(), config.device_blocks, config.host_blocks,
                    config.disk_blocks, 0, 0, 0, {"device": 0, "host": 0, "disk": 0})
    try:
        for index, request in enumerate(sorted(requests, key=lambda r: r.timestamp)):
            prompt = prompt_tokens(request, trace_block, index)
            hits = run.request(prompt, request.output_length)
            result.prompt_tokens += len(prompt)  # a request that cannot run misses every token
            if hits is None:
                result.skipped += 1
                continue
            result.requests += 1
            for tier, tokens in hits.items():
                result.hit_tokens[tier] += tokens
        run.drain()
        result.tier_stats = run.bm.tiers.stats()
        if unbounded and run.bm.pools[Device.DEVICE].num_evicted:
            raise RuntimeError("the unbounded device pool evicted a block: its size is computed wrong")
    finally:
        run.close()
    return result


# -- reporting -----------------------------------------------------------------------------------
HEADER = ["config (device, host, disk blocks)", "tokens: device / host / disk", "requests", "prompt tokens",
          "hit ratio", "device", "host", "disk", "of unbounded"]


def rows(results: list[Result], block_size: int) -> list[list]:
    bound = next((r for r in results if r.config == "unbounded"), None)
    out = []
    for r in results:
        sizes = ("unbounded" if r.config == "unbounded" else
                 " / ".join(str(n * block_size) for n in (r.device_blocks, r.host_blocks, r.disk_blocks)))
        of = f"{r.ratio() / bound.ratio():.3f}" if bound and bound.ratio() else ""
        out.append([r.config if r.config != "unbounded" else "unbounded", sizes, r.requests, r.prompt_tokens,
                    f"{100 * r.ratio():.1f}%", f"{100 * r.ratio('device'):.1f}%", f"{100 * r.ratio('host'):.1f}%",
                    f"{100 * r.ratio('disk'):.1f}%", of])
    return out


def run_all(requests: list[TraceRequest], configs: list[TierConfig], **kwargs) -> list[Result]:
    return [replay(requests, None, **kwargs)] + [replay(requests, c, **kwargs) for c in configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", nargs="?", help="a trace in Mooncake's JSONL format")
    parser.add_argument("--generate", metavar="PATH", help="write a synthetic trace with shared prefixes to PATH")
    parser.add_argument("--generate-chat", metavar="PATH",
                        help="write tools.bench_multiturn's chat workload (its default lengths, --conversations, "
                             "--turns and --clients) as a trace of --block-size blocks to PATH")
    parser.add_argument("--conversations", type=int, default=24, help="--generate-chat: conversations")
    parser.add_argument("--turns", type=int, default=8, help="--generate-chat: turns of each")
    parser.add_argument("--clients", type=int, default=2, help="--generate-chat: clients")
    parser.add_argument("--config", action="append", type=TierConfig.parse, default=[],
                        help="DEVICE,HOST,DISK blocks (repeatable; default: 64,0,0 64,256,0 64,0,576 64,256,320)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--trace-block", type=int, default=512, help="tokens per trace hash id (Mooncake: 512)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests holding their blocks at once")
    parser.add_argument("--prompts-only", action="store_true", help="leave the output tokens out")
    parser.add_argument("--store", choices=["disk", "memory"], default="disk",
                        help="the store tier: a DiskTier in a temporary folder, or an in-memory stand-in")
    parser.add_argument("--seed", type=int, default=0, help="--generate: the seed")
    parser.add_argument("--notes", default="", help="a paragraph to put under the table")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.generate:
        write_trace(args.generate, synthetic_trace(trace_block=args.trace_block, seed=args.seed))
        print(f"wrote {args.generate}", file=sys.stderr)
    if args.generate_chat:
        from tools.bench_multiturn import Sizes
        from tools.multiturn_workloads import multi_turn, to_trace

        s = Sizes()
        workload = multi_turn(args.conversations, args.turns, 49152, args.clients, s.system_tokens, s.context_mean,
                              s.context_range, s.message_mean, s.message_range, s.answer_mean, s.answer_range,
                              seed=args.seed)
        write_trace(args.generate_chat, (TraceRequest(r["timestamp"], r["input_length"], r["output_length"],
                                                      r["hash_ids"]) for r in to_trace(workload, args.block_size)))
        print(f"wrote {args.generate_chat}", file=sys.stderr)
    if (args.generate or args.generate_chat) and not args.trace:
        return 0
    if not args.trace:
        parser.error("name a trace (or --generate PATH)")
    requests = read_trace(args.trace)
    configs = args.config or [TierConfig(64), TierConfig(64, 256), TierConfig(64, 0, 576), TierConfig(64, 256, 320)]
    results = run_all(requests, configs, block_size=args.block_size, trace_block=args.trace_block, store=args.store,
                      concurrency=args.concurrency, prompts_only=args.prompts_only)
    description = (f"Trace: `{Path(args.trace).name}`, {len(requests)} requests, "
                   f"{len({h for r in requests for h in r.hash_ids})} distinct blocks of {args.trace_block} tokens; "
                   f"block size {args.block_size}; {args.concurrency} request(s) holding blocks at once; "
                   f"{'prompts only' if args.prompts_only else 'output tokens take blocks too'}; store tier: "
                   f"{'DiskTier (files)' if args.store == 'disk' else 'in-memory stand-in'}. Hit ratio: prompt tokens "
                   "found cached at admission over all prompt tokens, and which tier held them; the last column "
                   "divides by the unbounded cache's.")
    table = markdown_table(HEADER, rows(results, args.block_size))
    text = "\n\n".join(p for p in [description, table, args.notes] if p)
    print(text)
    out = output_folder(args, "replay_trace")
    (out / "results.json").write_text(json.dumps([{**asdict(r), "hit_ratio": r.ratio()} for r in results], indent=2))
    publish(TITLE, text, out, args.update_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
