"""A pruned copy's first evaluation pass against its second, with and without huge pages for torch's
CPU tensors: where a trial's overhead over one evaluation pass goes on the CPU.

A trial prunes a copy and evaluates it once; its unit of cost is one evaluation pass of that copy. On the
CPU the first pass of a new copy is slower than the next, and the copy itself writes gigabytes of fresh
memory. Both are the first touch of new memory: torch backs a large CPU tensor with transparent huge pages
when the process starts with ``THP_MEM_ALLOC_ENABLE=1`` (where the kernel's THP mode is ``madvise``),
which takes a page fault per 2 MiB instead of per 4 KiB. This runs the same trials in two fresh processes,
without and with it, side by side:

    python bench/first_pass.py                                      # the 3B shape in bf16
    python bench/first_pass.py --shape llama-3.2-1b --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

THP = "THP_MEM_ALLOC_ENABLE"


def child(args) -> None:
    import torch

    from adapruner.device import resolve_device, resolve_dtype
    from adapruner.evaluate import window_losses
    from adapruner.importance import metric_scores
    from adapruner.plan import make_plan
    from adapruner.prune import prune_model
    from adapruner.structure import model_structure

    sys.path.insert(0, str(Path(__file__).parent))
    from scale import random_model

    torch.set_num_threads(args.threads)
    device = resolve_device(None)
    model = random_model(args.shape, resolve_dtype(args.dtype, device), device)
    structure = model_structure(model)
    windows = torch.randint(0, 49152, (args.windows, 128), generator=torch.Generator().manual_seed(0))
    for rep in range(args.reps):
        # a different plan each trial, the same in both processes
        plan = make_plan(structure, metric_scores(model, structure.layers, "random", seed=rep), args.ratio)
        start = time.perf_counter()
        pruned = prune_model(model, plan, share_unchanged=True)
        prune = time.perf_counter() - start
        passes = []
        for _ in range(2):
            start = time.perf_counter()
            for _ in window_losses(pruned, windows, args.batch_size):
                pass
            passes.append(time.perf_counter() - start)
        print(json.dumps({"rep": rep, "prune": prune, "first": passes[0], "second": passes[1]}), flush=True)
        del pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-3b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"{args.shape} in {args.dtype}, {args.windows} windows of 128 tokens, batch {args.batch_size}, "
          f"{args.threads} threads; THP mode: {mode.read_text().strip() if mode.is_file() else 'unknown'}")
    print("\n| torch huge pages | trial | prune s | first pass s | second pass s | first / second | "
          "(prune + first) / second |\n|---|---:|---:|---:|---:|---:|---:|")
    for setting in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != THP} | {THP: setting}
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, check=True,
                             capture_output=True, text=True).stdout
        for row in (json.loads(line) for line in out.splitlines() if line.startswith("{")):
            print(f"| {'on' if setting == '1' else 'off'} | {row['rep']} | {row['prune']:.2f} | {row['first']:.2f} | "
                  f"{row['second']:.2f} | {row['first'] / row['second']:.2f} | "
                  f"{(row['prune'] + row['first']) / row['second']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
