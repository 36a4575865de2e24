"""Does the search's gain hold on text it never saw? Leave one built-in source out, search on the others.

For each built-in source (books, wiki, news) and seed: a study of ``--trials`` searched trials on
SmolLM2-135M at ``--ratio``, calibrated and validated on the other two sources, with the left-out source
as its held-out test, beside its baselines: LLM-Pruner's default over its 3 calibration draws (their
mean is the reference), the same re-fitted (``llm-pruner+repair``), FLAP and Wanda-sp as FLAP's code
computes them. Two starts: ``informed`` (LLM-Pruner's and FLAP's configurations and the shipped priors,
none of which saw the left-out source) and ``warm`` (also the chosen configurations of the other seeds'
informed studies of the same left-out source, copied into the warm study's own storage: studies that
never saw it). The smaller budgets (``--budgets``) are the same studies' first searched trials, chosen
among with the baselines as a study of that budget chooses (its first trials are the same: a trial's
proposal depends only on the trials before it), so one study serves every budget.

Reported per study and as means over seeds: the chosen model's perplexity on the left-out source
(out-of-domain) and on the test parts of the two sources it calibrated and validated on (in-domain), over
the mean of LLM-Pruner's draws and over the best other baseline (FLAP included); the chosen configuration
with and without its repair; and LLM-Pruner with and without the repair. Nothing here is tuned on these
numbers: the search sees only its validation text, the priors came from other studies (bench/priors.py).

    python bench/generalise.py                  # 18 studies of 40 trials; about 15 minutes each on 2 CPU cores
    python bench/generalise.py --seeds 0 --leave-out news --starts informed
    python bench/generalise.py --table-only     # the tables of what ran (runs/bench-generalise.json)
    python bench/generalise.py --seeds 0 --starts informed --far-validation builtin:jargon \
        --json runs/bench-far.json --storage sqlite:///runs/bench-far.db

``--far-validation``: the studies also validate (and choose their finalists) on a text far from both calibration
sources, which they never calibrate on and which is never reported as out-of-domain; in-domain test is still the
calibration sources' own.
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

from adapruner.data import BUILTIN_SOURCES, parse_draw
from adapruner.repair import Repair
from adapruner.search import SearchJob, baseline_trials, open_session, run_search, select
from adapruner.search.objective import geometric_mean, test_scores
from adapruner.search.record import StudyKey, TrialKey
from adapruner.search.selection import chosen_trial
from adapruner.session import PruneConfig

REFERENCE = "llm-pruner"
PEERS = ("flap", "wanda-sp", "llm-pruner+repair")  # the other baselines; the best of them is the bar


def in_domain(job: SearchJob, by_source: dict, summary: float) -> float:
    """The geometric mean over the sources ``job`` calibrates on (``summary``, the mean over every evaluation source,
    when it validates on nothing else)."""
    names = [parse_draw(spec, 0)[0].removeprefix("builtin:") for spec in job.calibration]
    if not job.evaluation or set(names) == set(by_source):
        return summary
    return geometric_mean(by_source[name] for name in names)


def scores(attrs: dict, job: SearchJob) -> dict:
    return {"in_domain": in_domain(job, attrs["test_ppl_by_source"], attrs["test_ppl"]),
            "out_of_domain": attrs["heldout_ppl"],
            "by_source": {**attrs["test_ppl_by_source"], **attrs["heldout_ppl_by_source"]}}


def chosen_at(study: optuna.Study, session, job: SearchJob, budget: int) -> dict:
    """The choice a study of ``budget`` searched trials makes: its baselines and first ``budget`` searched trials."""
    trials = study.get_trials(deepcopy=False)
    searched = [t for t in trials if TrialKey.BASELINE not in t.user_attrs][:budget]
    known = {r["trial"]: r["selection_ppl"] for r in study.user_attrs[StudyKey.SELECTION]["finalists"]}
    record = select(session, job, [t for t in trials if TrialKey.BASELINE in t.user_attrs] + searched, known)
    trial = trials[record["chosen"]]
    return {"trial": trial.number, "baseline": trial.user_attrs.get(TrialKey.BASELINE), **scores(record["scores"], job),
            "config": trial.user_attrs[TrialKey.CONFIG],
            "finalists": record["finalists"]}


def without_repair(session, job: SearchJob, config: dict) -> dict | None:
    """The chosen configuration's model without its repair (None when it has none)."""
    config = PruneConfig.from_dict(config)
    if not config.repair.enabled:
        return None
    plain = PruneConfig(config.mixture, config.subset, config.allocation, Repair())
    return scores(test_scores(session, session.prune(plain, job.target)[0]), job)


def summarise(study: optuna.Study, session, job: SearchJob, budgets: list[int]) -> dict:
    baselines = baseline_trials(study)
    chosen = chosen_trial(study)
    best = {budget: chosen_at(study, session, job, budget) for budget in budgets if budget < job.trials}
    best[job.trials] = {"trial": chosen.number, "baseline": chosen.user_attrs.get(TrialKey.BASELINE),
                        **scores(chosen.user_attrs, job), "config": chosen.user_attrs[TrialKey.CONFIG],
                        "finalists": study.user_attrs[StudyKey.SELECTION]["finalists"]}
    unpruned = study.user_attrs[StudyKey.UNPRUNED]
    reference = baselines[REFERENCE]
    return {
        "unpruned": {"in_domain": in_domain(job, unpruned.get("test_by_source", {}), unpruned["test"]),
                     "out_of_domain": unpruned["heldout"]},
        "baselines": {name: scores(t.user_attrs, job) for name, t in baselines.items()},
        "llm_pruner_draws": [{"in_domain": in_domain(job, d["test_ppl_by_source"], d["test_ppl"]),
                              "out_of_domain": d["heldout_ppl"]}
                             for d in reference.user_attrs[TrialKey.DRAWS]],
        "best": {str(b): v for b, v in best.items()},
        "best_without_repair": without_repair(session, job, best[job.trials]["config"]),
    }


def run(args) -> list[dict]:
    Path("runs").mkdir(exist_ok=True)
    rows = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []
    done = {(r["left_out"], r["seed"], start_label(r)) for r in rows}
    far = tuple(args.far_validation.split(",")) if args.far_validation else ()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    for start in args.starts.split(","):  # informed first: the warm studies start from them
        for seed in (int(s) for s in args.seeds.split(",")):
            for left_out in args.leave_out.split(","):
                if (left_out, seed, start_label({"start": start, "far_validation": far})) in done:
                    continue
                calibration = tuple(f"builtin:{name}" for name in BUILTIN_SOURCES if name != left_out)
                job = SearchJob(model="smollm2-135m", calibration=calibration, heldout=(f"builtin:{left_out}",),
                                evaluation=(*calibration, *far) if far else (),
                                target=args.ratio, trials=max(budgets), seed=seed, pool_size=args.pool_size,
                                val_windows=args.val_windows, test_windows=args.test_windows, start=start,
                                measure_cost=False)
                name = f"generalise-{left_out}-s{seed}"
                storage = args.storage if start == "informed" else warm_storage(args, left_out, seed, name)
                session = open_session(job, progress=False)
                begin = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="adapruner-bench-") as artifacts:
                    study = run_search(job, storage, f"{name}-{start}{'-far' if far else ''}", session=session,
                                       artifact_dir=artifacts, progress=False).study
                row = {"left_out": left_out, "seed": seed, "start": start, "far_validation": far,
                       "informed": study.user_attrs.get(StudyKey.INFORMED_START),
                       **summarise(study, session, job, budgets), "seconds": round(time.perf_counter() - begin)}
                rows.append(row)
                print(f"{name}-{start_label(row)}: {json.dumps(row['best'][str(max(budgets))]['out_of_domain'])}",
                      file=sys.stderr, flush=True)
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def start_label(row: dict) -> str:
    """The start, and whether validation also read far text (``--far-validation``)."""
    return f"{row['start']} + far validation" if row.get("far_validation") else row["start"]


def warm_storage(args, left_out: str, seed: int, name: str) -> str:
    """A storage of the warm study's own holding the informed studies of the other seeds for the same left-out
    source (none of which saw it)."""
    url = args.storage.replace(".db", f"-warm-{left_out}-s{seed}.db")
    copied = {s.study_name for s in optuna.get_all_study_summaries(url)} if Path(url[10:]).is_file() else set()
    for other in optuna.get_all_study_summaries(args.storage):
        same_source = other.study_name.startswith(f"generalise-{left_out}-s") and other.study_name.endswith("-informed")
        if same_source and other.study_name != f"{name}-informed" and other.study_name not in copied:
            optuna.copy_study(from_study_name=other.study_name, from_storage=args.storage, to_storage=url)
    return url


def markdown(rows: list[dict], command: str, budgets: list[int]) -> str:
    top = max(budgets)
    lines = [f"Command: `{command}`", "",
             "Out-of-domain (the left-out source's test part), perplexity:", "",
             "| left out | seed | start | LLM-Pruner, mean of 3 draws (range) | +repair | FLAP | Wanda-sp | "
             + " | ".join(f"best at {b}" for b in budgets) + f" | best at {top} / LLM-Pruner | "
             f"best at {top} / best other |",
             "|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(budgets) + "---:|---:|"]
    for r in rows:
        ood = lambda name, r=r: r["baselines"][name]["out_of_domain"]  # noqa: E731
        draws = [d["out_of_domain"] for d in r["llm_pruner_draws"]]
        other = min(ood(p) for p in PEERS if p in r["baselines"])
        best = {b: r["best"][str(b)]["out_of_domain"] for b in budgets}
        lines.append(f"| {r['left_out']} | {r['seed']} | {start_label(r)} | {ood(REFERENCE):.1f} ({min(draws):.1f}-"
                     f"{max(draws):.1f}) | {ood('llm-pruner+repair'):.1f} | {ood('flap'):.1f} | "
                     f"{ood('wanda-sp'):.1f} | "
                     + " | ".join(f"{best[b]:.1f}" for b in budgets)
                     + f" | {best[top] / ood(REFERENCE):.3f} | {best[top] / other:.3f} |")
    lines += ["", "Mean over seeds, per left-out source (out-of-domain; in-domain in brackets):", "",
              "| left out | start | " + " | ".join(f"best at {b} / LLM-Pruner (max)" for b in budgets)
              + f" | best at {top} / best other baseline | repair: with / without | LLM-Pruner+repair / LLM-Pruner |",
              "|---|---|" + "---:|" * len(budgets) + "---:|---:|---:|"]
    for left in dict.fromkeys(r["left_out"] for r in rows):
        for start in dict.fromkeys(start_label(r) for r in rows):
            group = [r for r in rows if r["left_out"] == left and start_label(r) == start]
            if not group:
                continue
            cells = []
            for b in budgets:
                out = [r["best"][str(b)]["out_of_domain"] / r["baselines"][REFERENCE]["out_of_domain"] for r in group]
                ind = [r["best"][str(b)]["in_domain"] / r["baselines"][REFERENCE]["in_domain"] for r in group]
                cells.append(f"{statistics.mean(out):.3f} ({max(out):.3f}) [{statistics.mean(ind):.3f}]")
            other = [r["best"][str(top)]["out_of_domain"] / min(r["baselines"][p]["out_of_domain"] for p in PEERS)
                     for r in group]
            other_in = [r["best"][str(top)]["in_domain"] / min(r["baselines"][p]["in_domain"] for p in PEERS)
                        for r in group]
            repaired = [r for r in group if r["best_without_repair"]]
            repair = [r["best"][str(top)]["out_of_domain"] / r["best_without_repair"]["out_of_domain"]
                      for r in repaired]
            repair_cell = f"{statistics.mean(repair):.3f} ({len(repair)} of {len(group)})" if repair else "— (none)"
            lp = [r["baselines"]["llm-pruner+repair"]["out_of_domain"] / r["baselines"][REFERENCE]["out_of_domain"]
                  for r in group]
            lines.append(f"| {left} | {start} | " + " | ".join(cells)
                         + f" | {statistics.mean(other):.3f} [{statistics.mean(other_in):.3f}] | {repair_cell} | "
                         f"{statistics.mean(lp):.3f} |")
    for start in dict.fromkeys(start_label(r) for r in rows):
        group = [r for r in rows if start_label(r) == start]
        for b in budgets:
            out = [r["best"][str(b)]["out_of_domain"] / r["baselines"][REFERENCE]["out_of_domain"] for r in group]
            worse = sum(o > 1 for o in out)
            lines.append(f"\n{start}, {b} trials: out-of-domain ratio to LLM-Pruner's mean {statistics.mean(out):.3f} "
                         f"(geometric {math.exp(statistics.mean(math.log(o) for o in out)):.3f}, max {max(out):.3f}); "
                         f"worse than it in {worse} of {len(out)} studies.")
    lines.append(f"\n{sum(r['seconds'] for r in rows) / 60:.0f} minutes in all.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave-out", default=",".join(BUILTIN_SOURCES), help="built-in sources to leave out")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="12,40", help="searched-trial budgets; the largest is run")
    parser.add_argument("--starts", default="informed,warm")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--test-windows", type=int, default=32)
    parser.add_argument("--storage", default="sqlite:///runs/bench-generalise.db")
    parser.add_argument("--json", default="runs/bench-generalise.json")
    parser.add_argument("--far-validation", default="",
                        help="text sources, comma-separated, the studies also validate on (never calibrate on, never "
                             "report as out-of-domain): text far from both calibration sources")
    parser.add_argument("--table-only", action="store_true", help="print the tables of the studies in --json, run none")
    args = parser.parse_args()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    rows = json.loads(Path(args.json).read_text()) if args.table_only else run(args)
    print(markdown(rows, "python bench/generalise.py " + " ".join(sys.argv[1:]), budgets))


if __name__ == "__main__":
    main()
