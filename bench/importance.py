"""How fast is importance for a calibration subset, from cached per-sample statistics vs. recomputed?

On SmolLM2-135M with a pool of 64 book windows: milliseconds to assemble each metric's importance
for a subset of k samples from the pool statistics, beside what the same numbers cost without them
(a forward and backward pass per sample of the subset), measured side by side in one run.

    python bench/importance.py
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from adapruner.importance import DECOMPOSABLE, Mixture, subset_importance
from adapruner.search import SearchJob, open_session
from adapruner.statistics import collect_statistics, taylor_first_exact


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    session = open_session(SearchJob(pool_size=64), progress=False)
    stats = session.statistics  # cached on disk after the first run
    shapes = session.structure.layers
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"SmolLM2-135M, pool of {stats.n_samples} windows x {stats.tokens} tokens, "
          f"{torch.get_num_threads()} CPU threads.\n")
    rows = []
    for k in (4, 10, 32):
        subset = session.random_subset(k, seed=k)
        windows = session.pool.windows[list(subset)]
        per_sample = timed(lambda w=windows: collect_statistics(session.model, w, progress=False), 1)
        exact = timed(lambda w=windows: taylor_first_exact(session.model, w), 1)
        for metric in [m for m in DECOMPOSABLE if m != "random"]:
            mixture = Mixture.single(metric)
            # what a trial runs: the session's cached weight summary, the pool statistics
            seconds = timed(lambda m=mixture, s=subset: subset_importance(
                session.model, shapes, m, s, stats, session.pool.windows, session.weight_summary), 5)
            # magnitude needs no data: there is nothing to recompute, so no speed-up to claim
            rows.append((metric, k, seconds, per_sample if mixture.needs_data else None))
        rows.append(("taylor_first (exact: not decomposable, a backward per trial)", k, None, exact))
    print("| metric | subset k | importance from statistics (ms) | recomputing it: forward + backward over "
          "the subset (s) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for metric, k, seconds, direct in rows:
        ms = "—" if seconds is None else f"{1000 * seconds:.1f}"
        again = "—" if direct is None else f"{direct:.1f}"
        speedup = "—" if seconds is None or direct is None else f"{direct / seconds:,.0f}x"
        print(f"| {metric} | {k} | {ms} | {again} | {speedup} |")

if __name__ == "__main__":
    main()
