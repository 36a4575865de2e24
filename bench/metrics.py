"""Importance metrics on the real model: SmolLM2-135M pruned by 20% of all parameters.

Calibration as LLM-Pruner's default: 10 random windows of 128 tokens from the books pool; layers
4..n-2 pruned; each metric alone (sum over the group, and ``last`` where it differs); test perplexity
of the books test split. The unpruned model and ``random`` frame the table.

    python bench/metrics.py
"""

from __future__ import annotations

import argparse
import sys
import time

from adapruner.importance import METRICS, Mixture
from adapruner.plan import Allocation
from adapruner.search import SearchJob, open_session
from adapruner.session import PruneConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--test-windows", type=int, default=64)
    args = parser.parse_args()
    session = open_session(SearchJob(pool_size=args.samples, test_windows=args.test_windows), progress=False)
    subset = tuple(range(len(session.pool)))
    layers = Allocation.named("layer_range")
    dense = session.perplexity(session.model, "test").ppl
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"SmolLM2-135M, {args.ratio:.0%} of all parameters removed, {args.samples} random book windows of 128 "
          f"tokens as calibration, layers 4..27 pruned, test ppl on {session.windows('test').shape[0]} book "
          f"windows of 128 tokens. Unpruned: {dense:.2f}.\n")
    print("| metric | aggregation | test ppl | seconds (importance + plan + slice) |")
    print("|---|---|---:|---:|")
    for metric in METRICS:
        for aggregation in (("sum",) if metric in ("flap_fluctuation", "random") else ("sum", "last")):
            start = time.perf_counter()
            pruned, plan = session.prune(PruneConfig(Mixture.single(metric, aggregation), subset, layers), args.ratio)
            seconds = time.perf_counter() - start
            ppl = session.perplexity(pruned, "test").ppl
            label = f"**{metric}** (LLM-Pruner default)" if (metric, aggregation) == ("taylor_first", "sum") else metric
            print(f"| {label} | {aggregation} | {ppl:,.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
