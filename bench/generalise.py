"""Does the search's gain hold on text it never saw? Leave one built-in source out, search on the others.

For each built-in source (books, wiki, news) and seed: one study of ``--trials`` trials (baselines
included) on SmolLM2-135M at ``--ratio``, calibrated and validated on the other two sources, with the
left-out source as its held-out test. Reported per study and as mean ± sd over seeds: the test
perplexity of LLM-Pruner's default (the ``llm-pruner`` baseline, faithful to LLM-Pruner's own code)
and of the best-by-validation searched configuration, in-domain (the test parts of the two sources the
search calibrated and validated on) and out-of-domain (the test part of the left-out source), and
the ratio best / LLM-Pruner. Nothing here is tuned on the held-out numbers: the search sees only
its validation text.

Studies live in one SQLite file and resume by name; the best models' archives go to a temporary
folder that is removed afterwards.

    python bench/generalise.py            # 9 studies; on 2 CPU cores 10-12 minutes each (579 and 719 s
                                          # measured); the statistics, Grams and baseline gradients are
                                          # cached, so a second run skips them
    python bench/generalise.py --seeds 0 --trials 12 --leave-out news
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

from adapruner.data import BUILTIN_SOURCES
from adapruner.search import SearchJob, baseline_trials, run_search

BASELINE = "llm-pruner"
REPAIRED = "llm-pruner+repair"  # the same model re-fitted by least squares: the repair's gain apart from the search's


def summarise(study: optuna.Study, left_out: str, seconds: float) -> dict:
    best, baselines = study.best_trial, baseline_trials(study)
    reference = baselines[BASELINE]
    dense = study.user_attrs["dense"]

    def scores(attrs: dict) -> dict:
        return {"in_domain": attrs["test_ppl"], "out_of_domain": attrs["heldout_ppl"],
                "by_source": {**attrs["test_ppl_by_source"], **attrs["heldout_ppl_by_source"]}}

    return {
        "left_out": left_out, "best_trial": best.number, "best_is_baseline": bool(best.user_attrs.get("baseline")),
        "unpruned": {"in_domain": dense["test"], "out_of_domain": dense["heldout"]},
        "llm_pruner": scores(reference.user_attrs), "best": scores(best.user_attrs),
        **({"llm_pruner_repair": scores(baselines[REPAIRED].user_attrs)} if REPAIRED in baselines else {}),
        "best_config": best.user_attrs["config"], "ratio": best.user_attrs["ratio"], "seconds": round(seconds),
    }


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| left out | seed | LLM-Pruner in-domain | best in-domain | ratio | LLM-Pruner out-of-domain | "
             "best out-of-domain | ratio | best worse on |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lp, best = r["llm_pruner"], r["best"]
        worse = [name for name, ppl in best["by_source"].items() if ppl > lp["by_source"][name]]
        lines.append(
            f"| {r['left_out']} | {r['seed']} | {lp['in_domain']:.1f} | {best['in_domain']:.1f} | "
            f"{best['in_domain'] / lp['in_domain']:.3f} | {lp['out_of_domain']:.1f} | {best['out_of_domain']:.1f} | "
            f"{best['out_of_domain'] / lp['out_of_domain']:.3f} | {', '.join(worse) or '—'} |")
    lines += ["", "| left out | unpruned out-of-domain | LLM-Pruner out-of-domain | best out-of-domain | "
              "ratio, mean of seeds (max) | in-domain ratio, mean of seeds |", "|---|---:|---:|---:|---:|---:|"]
    for left in dict.fromkeys(r["left_out"] for r in rows):
        group = [r for r in rows if r["left_out"] == left]
        ood = [r["best"]["out_of_domain"] / r["llm_pruner"]["out_of_domain"] for r in group]
        ind = [r["best"]["in_domain"] / r["llm_pruner"]["in_domain"] for r in group]
        lines.append(f"| {left} | {mean_sd([r['unpruned']['out_of_domain'] for r in group])} | "
                     f"{mean_sd([r['llm_pruner']['out_of_domain'] for r in group])} | "
                     f"{mean_sd([r['best']['out_of_domain'] for r in group])} | "
                     f"{statistics.mean(ood):.3f} ({max(ood):.3f}) | {statistics.mean(ind):.3f} |")
    repaired = [r for r in rows if "llm_pruner_repair" in r]
    if repaired:
        lines += ["", "The repair alone: LLM-Pruner's own choice of groups, re-fitted by least squares "
                  "(`llm-pruner+repair`).",
                  "", "| left out | seed | LLM-Pruner out-of-domain | LLM-Pruner+repair out-of-domain | ratio | "
                  "best out-of-domain | best / LLM-Pruner+repair |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in repaired:
            lp, rep, best = (r[k]["out_of_domain"] for k in ("llm_pruner", "llm_pruner_repair", "best"))
            lines.append(f"| {r['left_out']} | {r['seed']} | {lp:.1f} | {rep:.1f} | {rep / lp:.3f} | {best:.1f} | "
                         f"{best / rep:.3f} |")
    ood_all = [r["best"]["out_of_domain"] / r["llm_pruner"]["out_of_domain"] for r in rows]
    lines += ["", f"All studies: out-of-domain ratio mean {statistics.mean(ood_all):.3f}, "
              f"max {max(ood_all):.3f}, geometric mean "
              f"{math.exp(statistics.mean(math.log(x) for x in ood_all)):.3f}; "
              f"{sum(r['seconds'] for r in rows) / 60:.0f} minutes."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave-out", default=",".join(BUILTIN_SOURCES), help="built-in sources to leave out")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--val-windows", type=int, default=32)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--baselines", default=f"{BASELINE},{REPAIRED}",
                        help="comma-separated; llm-pruner is the reference")
    parser.add_argument("--storage", default="sqlite:///runs/bench-generalise.db")
    parser.add_argument("--json", default="runs/bench-generalise.json")
    parser.add_argument("--table-only", action="store_true", help="print the table of the studies in --json, run none")
    args = parser.parse_args()
    if args.table_only:
        print(markdown(json.loads(Path(args.json).read_text()), "python bench/generalise.py " + " ".join(sys.argv[1:])))
        return
    Path("runs").mkdir(exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: an interrupted run covers every source
        for left_out in args.leave_out.split(","):
            calibration = tuple(f"builtin:{name}" for name in BUILTIN_SOURCES if name != left_out)
            job = SearchJob(model="smollm2-135m", calibration=calibration, heldout=(f"builtin:{left_out}",),
                            ratio=args.ratio, trials=args.trials, sampler=args.sampler, seed=seed,
                            pool_size=args.pool_size, val_windows=args.val_windows, test_windows=args.test_windows,
                            baselines=tuple(b for b in args.baselines.split(",") if b))
            name = f"generalise-{left_out}-s{seed}-t{args.trials}-r{args.ratio:g}-{args.sampler}"
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="adapruner-bench-") as artifacts:
                study = run_search(job, args.storage, name, artifact_dir=artifacts, progress=False).study
            rows.append({"seed": seed, **summarise(study, left_out, time.perf_counter() - start)})
            print(f"{name}: {json.dumps({k: rows[-1][k] for k in ('llm_pruner', 'best')})}", file=sys.stderr,
                  flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, "python bench/generalise.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
