"""Can the cached pool statistics be stored in 16 bits? Importance rankings and plans from fp32 vs bf16 vs fp16.

The statistics are kept per pool sample (``N x units`` numbers, :mod:`adapruner.statistics`); storing them
in 16 bits halves that memory and the cache file. Each trial sums a subset's rows in fp32, so what a
16-bit store changes is each sample's row rounded once. On SmolLM2-135M with the default job's pool
(books + wiki, 64 windows), for every data metric of the default search space and for their equal
mixture, on random calibration subsets: the Spearman correlation of the MLP channel scores (mean over
layers) and of the attention group scores, the share of the units a 20% plan removes that the fp32 plan
removes too, and for the mixture the validation perplexity of both plans.

    python bench/stats_dtype.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from adapruner.evaluate import window_losses
from adapruner.importance import Mixture
from adapruner.prune import prune_model
from adapruner.search import SearchJob, open_session
from adapruner.search.space import DEFAULT_METRICS
from adapruner.session import PruneConfig
from adapruner.statistics import PoolStatistics, collect_statistics

DATA_METRICS = ("taylor_first_persample", "taylor_second", "taylor_vector", "wanda_sp", "flap_fluctuation")


def stored_as(stats: PoolStatistics, dtype: torch.dtype) -> PoolStatistics:
    cast = lambda table: {k: v.to(dtype) for k, v in table.items()}  # noqa: E731
    # as collect_statistics(dtype=...) stores them: the per-unit rows rounded once, layer_cos and embedding fp32
    return PoolStatistics(cast(stats.taylor), cast(stats.act_sum), cast(stats.act_sq), stats.layer_cos,
                          stats.embedding, stats.tokens, dict(stats.meta))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def removed_units(session, plan) -> set[tuple]:
    units = set()
    for i, (shape, lp) in enumerate(zip(session.structure.layers, plan.layers, strict=True)):
        units |= {(i, "g", g) for g in set(range(shape.n_groups)) - set(lp.keep_groups)}
        units |= {(i, "c", c) for c in set(range(shape.n_channels)) - set(lp.keep_channels)}
    return units


def val_ppl(session, plan) -> float:
    pruned = prune_model(session.model, plan)
    losses = [loss for _, loss in window_losses(pruned, session.windows("validation"), 8)]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subsets", type=int, default=4, help="random subsets of each size")
    parser.add_argument("--sizes", default="8,32")
    parser.add_argument("--ratio", type=float, default=0.2)
    args = parser.parse_args()
    session = open_session(SearchJob(), progress=False)
    full = collect_statistics(session.model, session.pool.windows, progress=False, dtype=torch.float32)
    stores = {"bfloat16": stored_as(full, torch.bfloat16), "float16": stored_as(full, torch.float16)}
    for name, s in stores.items():
        bad = sum(int((~torch.isfinite(t)).sum()) for table in (s.taylor, s.act_sum, s.act_sq) for t in table.values())
        zero = sum(int(((s_table[key] == 0) & (f_table[key] != 0)).sum())
                   for s_table, f_table in ((s.taylor, full.taylor), (s.act_sq, full.act_sq)) for key in f_table)
        print(f"{name}: {bad} overflowed to inf, {zero} non-zero numbers flushed to zero")
    print(f"\nCommand: `python {' '.join(sys.argv)}`\n")
    print(f"SmolLM2-135M, pool of {full.n_samples} windows x {full.tokens} tokens, ratio {args.ratio}, "
          f"{args.subsets} random subsets of each size.\n")
    print("| metric | store | subset k | Spearman MLP channels (min) | Spearman attention groups (min) | "
          "same removed units (min) |")
    print("|---|---|---:|---:|---:|---:|")
    ppl_rows = []
    for metric in [*DATA_METRICS, "mixture"]:
        mixture = Mixture({m: 1.0 for m in DEFAULT_METRICS}) if metric == "mixture" else Mixture.single(metric)
        for k in (int(x) for x in args.sizes.split(",")):
            subsets = [session.random_subset(k, seed=s) for s in range(args.subsets if k < len(session.pool) else 1)]
            for name, stats in stores.items():
                mlp, attn, same = [], [], []
                for subset in subsets:
                    config = PruneConfig(mixture, subset)
                    session.__dict__["statistics"] = full
                    ref = session.importance(config)
                    ref_plan = session.plan(config, args.ratio, ref)
                    session.__dict__["statistics"] = stats
                    got = session.importance(config)
                    got_plan = session.plan(config, args.ratio, got)
                    mlp.append(statistics.mean(spearman(a, b) for a, b in zip(ref.mlp, got.mlp, strict=True)))
                    attn.append(statistics.mean(spearman(a, b) for a, b in zip(ref.attn, got.attn, strict=True)))
                    removed, removed_ref = removed_units(session, got_plan), removed_units(session, ref_plan)
                    same.append(len(removed & removed_ref) / len(removed_ref))
                    if metric == "mixture" and name == "bfloat16" and k == 8:
                        ppl_rows.append((subset, val_ppl(session, ref_plan), val_ppl(session, got_plan)))
                print(f"| {metric} | {name} | {k} | {statistics.mean(mlp):.5f} ({min(mlp):.5f}) | "
                      f"{statistics.mean(attn):.5f} ({min(attn):.5f}) | "
                      f"{statistics.mean(same):.4f} ({min(same):.4f}) |", flush=True)
    session.__dict__["statistics"] = full
    print("\nEqual mixture of the default metrics, k = 8, validation perplexity of the plan:\n")
    print("| subset | fp32 statistics | bf16 statistics | ratio |")
    print("|---|---:|---:|---:|")
    for subset, ref, got in ppl_rows:
        print(f"| {','.join(map(str, subset))} | {ref:.3f} | {got:.3f} | {got / ref:.4f} |")


if __name__ == "__main__":
    main()
