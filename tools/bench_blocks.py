"""Block-manager speed: one decode-like step (append_slots for every running sequence, as the
scheduler calls it; decoded blocks reach the prefix cache when a sequence is freed) and
allocate/fork/free/swap churn, against a budget of 0.5 ms per step for 256 sequences."""
from __future__ import annotations

import argparse
import random
import statistics
import time

from pagedkv.kvcache.block_manager import BlockManager
from pagedkv.kvcache.sequence import Sequence, SequenceGroup
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish


def decode_step_times(num_seqs: int, block_size: int, steps: int) -> list[float]:
    blocks_per_seq = -(-(512 + steps) // block_size)
    bm = BlockManager(block_size, num_device_blocks=num_seqs * blocks_per_seq, num_cpu_blocks=0)
    rng = random.Random(0)
    seqs = []
    for i in range(num_seqs):
        seq = Sequence.from_prompt([rng.randrange(50_000) for _ in range(rng.randint(16, 512))])
        bm.allocate(SequenceGroup(str(i), [seq]))
        seq.num_computed_tokens = len(seq)
        bm.cache_computed(seq)
        seqs.append(seq)
    times = []
    for _ in range(steps):
        for seq in seqs:
            seq.token_ids.append(rng.randrange(50_000))
        start = time.perf_counter()
        for seq in seqs:
            bm.append_slots(seq)
        times.append(time.perf_counter() - start)
    return times


def churn_times(num_groups: int, block_size: int, rounds: int) -> list[float]:
    """Per round: admit groups of 4 samples, fork, grow with copy-on-write, swap out and in, free."""
    bm = BlockManager(block_size, num_device_blocks=num_groups * 64, num_cpu_blocks=num_groups * 64)
    times = []
    for r in range(rounds):
        groups = [SequenceGroup(f"{r}-{i}", [Sequence.from_prompt([3] * 100)]) for i in range(num_groups)]
        start = time.perf_counter()
        for g in groups:
            bm.allocate(g)
            parent = g.seqs[0]
            for _ in range(3):
                child = parent.fork()
                bm.fork(parent, child)
                g.seqs.append(child)
            for seq in g.seqs:
                seq.token_ids.append(4)
                bm.append_slots(seq)
            bm.swap_out(g)
            bm.swap_in(g)
            for seq in g.seqs:
                bm.free(seq)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = []
    for num_seqs in (64, 256, 1024):
        for block_size in (1, 16):
            t = statistics.median(decode_step_times(num_seqs, block_size, args.steps)) * 1e3
            rows.append([f"decode step, append_slots x{num_seqs}", block_size, f"{t:.3f}",
                         f"{t * 1e3 / num_seqs:.2f}"])
    t = statistics.median(churn_times(64, 16, max(args.steps // 10, 5))) * 1e3
    rows.append(["churn: 64 groups x (allocate, 3 forks, CoW, swap out+in, free)", 16, f"{t:.3f}",
                 f"{t * 1e3 / 64:.2f} per group"])
    table = markdown_table(["operation", "block size", "median ms", "us per sequence"], rows)
    print(table)
    publish("Block manager (CPU)", table + "\n\nTarget: a decode step for 256 sequences under 0.5 ms, small "
            "next to a model step.", output_folder(args, "bench_blocks"), args.update_docs)


if __name__ == "__main__":
    main()
