"""Repair after the cut: what re-fitting the kept weights adds, apart from the search and on top of it.

For each ratio and seed, two studies on SmolLM2-135M, calibrated and validated on ``builtin:books`` and
tested on the test parts of books (in-domain) and of wiki and news (held out: never calibrated or
validated on): one searches without repair (``repairs=off``), the other re-fits every trial's cut
(``repairs=pool``). Both start with the ``llm-pruner`` and ``llm-pruner+repair`` baselines: LLM-Pruner's
own model, as it is and re-fitted. Reported per source as mean ± sd over seeds: unpruned, LLM-Pruner,
LLM-Pruner + repair, best searched without repair, best searched with repair (best = best by
validation); and the cost of a trial as a ratio to one validation pass of its pruned model (trials
that ran every validation window), with and without repair, from the same run. Nothing is tuned on
the test numbers.

    python bench/repair.py                          # 2 ratios x 3 seeds x 2 studies
    python bench/repair.py --ratios 0.2 --seeds 0 --trials 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

from adapruner.search import SearchJob, SearchSpace, baseline_trials, run_search
from adapruner.search.record import StudyKey, TrialKey, baseline_of

SOURCES = ("books", "wiki", "news")
ROWS = (("unpruned", "unpruned"), ("LLM-Pruner", "llm_pruner"), ("LLM-Pruner + repair", "llm_pruner_repair"),
        ("best searched, no repair", "best_plain"), ("best searched, with repair", "best_repaired"))


def by_source(attrs: dict) -> dict[str, float]:
    return {**attrs.get("test_ppl_by_source", {}), **attrs.get("heldout_ppl_by_source", {})}


def trial_cost(study: optuna.Study) -> float | None:
    """Mean over searched trials that saw every validation window: trial seconds (test scoring left out)
    over the seconds of its validation pass."""
    full = study.user_attrs[StudyKey.DATA]["val_windows"]
    ratios = []
    for t in study.trials:
        seconds = t.user_attrs.get(TrialKey.SECONDS, {})
        if baseline_of(t) or t.user_attrs.get(TrialKey.WINDOWS) != full or not seconds.get("validation"):
            continue
        ratios.append(sum(v for k, v in seconds.items() if k != "test") / seconds["validation"])
    return statistics.mean(ratios) if ratios else None


def run_pair(args, ratio: float, seed: int) -> dict:
    studies = {}
    # The study without repair has only the plain baseline: with the re-fitted one beside it, its best
    # (by validation) would be that baseline, not a configuration without repair (seen in the first run:
    # every searched trial was stopped early against it).
    for kind, repairs, baselines in (("plain", ("off",), ("llm-pruner",)),
                                     ("repaired", ("pool",), ("llm-pruner", "llm-pruner+repair"))):
        job = SearchJob(model="smollm2-135m", calibration=("builtin:books",), heldout=("builtin:wiki", "builtin:news"),
                        target=ratio, trials=args.trials, sampler=args.sampler, seed=seed, pool_size=args.pool_size,
                        val_windows=args.val_windows, test_windows=args.test_windows,
                        baselines=baselines, space=SearchSpace(repairs=repairs))
        name = f"repair-{kind}-r{ratio:g}-s{seed}-t{args.trials}-{args.sampler}"
        with tempfile.TemporaryDirectory(prefix="adapruner-bench-") as artifacts:
            studies[kind] = run_search(job, args.storage, name, artifact_dir=artifacts, progress=False).study
    plain, repaired = studies["plain"], studies["repaired"]
    baselines = baseline_trials(repaired)
    unpruned = plain.user_attrs[StudyKey.UNPRUNED]
    return {
        "ratio": ratio, "seed": seed,
        "unpruned": {"books": unpruned["test"], **unpruned.get("heldout_by_source", {})},
        "llm_pruner": by_source(baselines["llm-pruner"].user_attrs),
        "llm_pruner_repair": by_source(baselines["llm-pruner+repair"].user_attrs),
        "best_plain": by_source(plain.best_trial.user_attrs),
        "best_repaired": by_source(repaired.best_trial.user_attrs),
        "best_configs": {"plain": plain.best_trial.user_attrs[TrialKey.CONFIG],
                         "repaired": repaired.best_trial.user_attrs[TrialKey.CONFIG]},
        "cost": {"plain": trial_cost(plain), "repaired": trial_cost(repaired)},
    }


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for ratio in dict.fromkeys(r["ratio"] for r in rows):
        group = [r for r in rows if r["ratio"] == ratio]
        seeds = ", ".join(str(r["seed"]) for r in group)
        lines += [f"**{ratio:.0%} of all parameters removed** (seeds {seeds}; test perplexity, mean ± sd)", "",
                  "| model | books (in-domain) | wiki (held out) | news (held out) |", "|---|---:|---:|---:|"]
        for label, key in ROWS:
            lines.append(f"| {label} | " + " | ".join(mean_sd([r[key][s] for r in group]) for s in SOURCES) + " |")
        ratio_row = [statistics.mean(r["best_repaired"][s] / r["best_plain"][s] for r in group) for s in SOURCES]
        worst = [max(r["best_repaired"][s] / r["best_plain"][s] for r in group) for s in SOURCES]
        lines.append("| best with repair / best without, mean (max) | "
                     + " | ".join(f"{m:.3f} ({w:.3f})" for m, w in zip(ratio_row, worst, strict=True)) + " |")
        repair_alone = [statistics.mean(r["llm_pruner_repair"][s] / r["llm_pruner"][s] for r in group)
                        for s in SOURCES]
        lines.append("| LLM-Pruner + repair / LLM-Pruner, mean | "
                     + " | ".join(f"{v:.3f}" for v in repair_alone) + " |")
        costs = {k: [r["cost"][k] for r in group if r["cost"][k] is not None] for k in ("plain", "repaired")}
        lines += ["", "Trial cost as a ratio to one validation pass of its pruned model (searched trials that ran "
                  "every validation window): "
                  + ", ".join(f"{k} {statistics.mean(v):.2f}" if v else f"{k} —" for k, v in costs.items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--val-windows", type=int, default=32)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--storage", default="sqlite:///runs/bench-repair.db")
    parser.add_argument("--json", default="runs/bench-repair.json")
    parser.add_argument("--table-only", action="store_true", help="print the table of the studies in --json, run none")
    args = parser.parse_args()
    command = "python bench/repair.py " + " ".join(sys.argv[1:])
    if args.table_only:
        print(markdown(json.loads(Path(args.json).read_text()), command))
        return
    Path("runs").mkdir(exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: an interrupted run covers both ratios
        for ratio in (float(r) for r in args.ratios.split(",")):
            start = time.perf_counter()
            rows.append({**run_pair(args, ratio, seed), "seconds": round(time.perf_counter() - start)})
            summary = {k: rows[-1][k] for k in ("llm_pruner", "best_repaired")}
            print(f"ratio {ratio:g} seed {seed}: {json.dumps(summary)}", file=sys.stderr, flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
