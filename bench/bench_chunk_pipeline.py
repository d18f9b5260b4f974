"""Chunk pipeline throughput on one core: FastCDC cut + BLAKE3 + lz4, from a file on disk.

    python bench/bench_chunk_pipeline.py [--mib 64] [--runs 5]

Data: semi-compressible (half random 4 KiB blocks, half text-like runs from a small
vocabulary), so lz4 sometimes helps and sometimes is skipped, as with real release trees.
One unmeasured run warms the page cache, then --runs measured ones: median (min-max) MB/s.
Raw runs go to chunk_pipeline.json beside the .md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchstats import DEFAULT_RUNS, cell, environment, json_path, summary, write_json
from meshd.release.chunker import StoredChunk, chunk_tree


def write_data(path: Path, size: int, seed: int = 42) -> None:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(500)]
    written = 0
    with open(path, "wb") as f:
        while written < size:
            random_block = rng.random() < 0.5
            block = rng.randbytes(4096) if random_block else b" ".join(rng.choices(words, k=600))
            block = block[: size - written]
            f.write(block)
            written += len(block)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--runs", "--repeat", dest="runs", type=int, default=DEFAULT_RUNS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chunk_pipeline.md"))
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "release.bin"
        write_data(path, size)
        times: list[float] = []
        stored = 0
        chunks = 0
        for i in range(args.runs + 1):
            stored = 0

            def sink(c: StoredChunk) -> None:
                nonlocal stored
                stored += len(c.stored)

            t0 = time.perf_counter()
            tree = chunk_tree(path, sink)
            if i:  # run 0 warms the page cache
                times.append(time.perf_counter() - t0)
            chunks = len(tree.chunk_sizes)
    mbps = summary([size / t / 1e6 for t in times])
    line = (
        f"chunk pipeline (fastcdc+blake3+lz4, 1 core): {args.mib} MiB at "
        f"{cell(mbps, lambda x: f'{x:.0f} MB/s')}; {chunks} chunks, mean {size / chunks / 1024:.0f} KiB, "
        f"stored {stored / size:.1%} of input"
    )
    print(line)
    env = environment()
    Path(args.out).write_text(
        f"# Chunk pipeline on one core\n\n`{env['command']}`, {env['date']} on {env['host']}, "
        f"median (min-max) over {args.runs} runs after one warm-up, semi-compressible data:\n\n{line}\n"
    )
    write_json(
        json_path(Path(args.out)),
        {
            "bench": "chunk_pipeline",
            "env": env,
            "conditions": {"mib": args.mib, "runs": args.runs, "cores": 1},
            "mb_per_s": mbps,
            "chunks": chunks,
            "stored_fraction": stored / size,
        },
    )


if __name__ == "__main__":
    main()
