"""Search benchmark: which sampler finds the best pruned SmolLM2-135M, and what does a trial cost?

For each seed and sampler, one study of ``--trials`` trials (baselines included) on SmolLM2-135M at
20%, books as calibration and evaluation text. Reported: the test perplexity of the best-by-validation
configuration after 10/20/40 finished trials beside the baselines of the same study; the per-phase
trial time and its ratio to one validation pass of the pruned model; how many validation windows
early stopping saved. ``--subset-mode random`` studies measure the clustered subset encoding against
plain random subsets.

Trial time is wall clock (Optuna's start and completion: sampler, storage writes and every phase).
"full trial less test / its pass": for trials that saw every validation window, that time less the
test scoring a new best gets for the report, over the trial's own validation pass. "mean trial / full
pass": the mean wall time of all searched trials (stopped ones and test scoring included) over the
mean full validation pass.

Studies live in one SQLite file and are resumed by name, so an interrupted run continues. Baselines
and the unpruned reference do not depend on the sampler, so studies of the same seed copy them from
the first study of that seed instead of computing them again.

    python bench/search.py                       # the full table (about 20 minutes on 2 CPU cores)
    python bench/search.py --samplers tpe --seeds 0 --trials 20
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from adapruner.search import (
    ESTIMATING_SAMPLERS,
    SearchJob,
    SearchSpace,
    baseline_trials,
    best_so_far,
    create_study,
    finished_trials,
    open_session,
    run_search,
)
from adapruner.search.record import StudyKey, TrialKey


def copy_reference(source: optuna.Study, target: optuna.Study) -> None:
    """Give ``target`` the baseline trials and unpruned perplexities already computed in ``source``."""
    for key in (StudyKey.UNPRUNED, StudyKey.DATA):
        target.set_user_attr(key, source.user_attrs[key])
    for trial in baseline_trials(source).values():
        target.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=trial.value, params={}, distributions={},
            user_attrs=trial.user_attrs, intermediate_values=trial.intermediate_values))


def run_one(job: SearchJob, name: str, storage: str, session, reference: optuna.Study | None) -> optuna.Study:
    if reference is not None:
        copied = SearchJob.from_dict({**job.to_dict(), "baselines": []})
        study = create_study(optuna.storages.RDBStorage(storage), name, copied)
        if not study.trials:
            copy_reference(reference, study)
        job = copied
    start = time.perf_counter()
    result = run_search(job, storage, name, session=session, artifact_dir=Path("runs/bench-artifacts"),
                        progress=True)
    print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return result.study


def summarise(study: optuna.Study, checkpoints: list[int]) -> dict:
    curve = best_so_far(study)
    at = {n: next((p for p in reversed(curve) if p.finished <= n), None) for n in checkpoints}
    baselines = {name: t.user_attrs.get(TrialKey.TEST_PPL) for name, t in baseline_trials(study).items()}
    searched = [t for t in finished_trials(study) if not t.user_attrs.get(TrialKey.BASELINE)]
    complete = [t for t in searched if t.state == TrialState.COMPLETE]
    data = study.user_attrs[StudyKey.DATA]

    def wall(t):  # everything the trial took, sampler and storage included, not just the timed phases
        return (t.datetime_complete - t.datetime_start).total_seconds()

    # A full pass: the validation phase of a trial that saw every window (GP/BoTorch complete stopped
    # trials with an estimate, so "complete" alone does not mean that).
    full = [t for t in complete if t.user_attrs.get(TrialKey.WINDOWS) == data["val_windows"]]
    # A new best is also scored on the test windows, for the report only: that is not search cost.
    ratios = [(wall(t) - t.user_attrs[TrialKey.SECONDS].get("test", 0.0)) / t.user_attrs[TrialKey.SECONDS]["validation"]
              for t in full]
    full_pass = statistics.mean(t.user_attrs[TrialKey.SECONDS]["validation"] for t in full) if full else None
    return {
        "study": study.study_name,
        "best_test": {n: (p.test_ppl if p else None) for n, p in at.items()},
        "best_val": {n: (p.val_ppl if p else None) for n, p in at.items()},
        "baselines": baselines,
        "unpruned": study.user_attrs[StudyKey.UNPRUNED],
        "windows_mean": statistics.mean(t.user_attrs.get(TrialKey.WINDOWS, 0) for t in searched) if searched else None,
        "windows_full": data["val_windows"],
        "seconds": {phase: statistics.mean(t.user_attrs.get(TrialKey.SECONDS, {}).get(phase, 0.0) for t in searched)
                    for phase in ("importance", "plan", "prune", "validation", "test")} if searched else {},
        "complete_ratio": statistics.mean(ratios) if ratios else None,
        "mean_trial_over_pass": (statistics.mean(wall(t) for t in searched) / full_pass
                                 if full_pass else None),
        "pruned": sum(t.state == TrialState.PRUNED or bool(t.user_attrs.get(TrialKey.ESTIMATED)) for t in searched),
        "searched": len(searched),
    }


def fmt(x, digits=1):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt(values[0])
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(rows: list[dict], checkpoints: list[int], command: str) -> str:
    out = [f"Command: `{command}`", ""]
    head = " | ".join(f"best test ppl @{n}" for n in checkpoints)
    out += [f"| sampler | calibration | seeds | {head} | LLM-Pruner test ppl | margin @{checkpoints[-1]} |",
            "|---|---|---|" + "---:|" * (len(checkpoints) + 2)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["sampler"], row["calibration"]), []).append(row)
    for (sampler, calibration), rs in groups.items():
        cells = " | ".join(mean_sd([r["best_test"][n] for r in rs]) for n in checkpoints)
        llm = [r["baselines"].get("llm-pruner") for r in rs]
        margins = [1 - r["best_test"][checkpoints[-1]] / r["baselines"]["llm-pruner"] for r in rs
                   if r["best_test"][checkpoints[-1]] and r["baselines"].get("llm-pruner")]
        margin = f"{100 * statistics.mean(margins):.1f}% lower" if margins else "—"
        out.append(f"| {sampler} | {calibration} | {','.join(str(r['seed']) for r in rs)} | {cells} | "
                   f"{mean_sd(llm)} | {margin} |")
    first = rows[0]
    per_seed = list({r["seed"]: r for r in rows}.values())  # the studies of one seed share their baselines
    out += ["", "Baselines and the unpruned model (test ppl, mean over seeds): "
            + ", ".join(f"{name} {mean_sd([r['baselines'].get(name) for r in per_seed])}"
                        for name in first["baselines"])
            + f", unpruned {mean_sd([r['unpruned']['test'] for r in per_seed])}.", ""]
    out += ["| sampler | calibration | seed | searched trials | stopped early | mean windows | "
            "importance s | plan s | prune s | validation s | test s | full trial less test / its pass | "
            "mean trial / full pass |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["seconds"]
        out.append(f"| {r['sampler']} | {r['calibration']} | {r['seed']} | {r['searched']} | {r['pruned']} | "
                   f"{fmt(r['windows_mean'])} of {r['windows_full']} | {fmt(s.get('importance'), 2)} | "
                   f"{fmt(s.get('plan'), 2)} | {fmt(s.get('prune'), 2)} | {fmt(s.get('validation'))} | "
                   f"{fmt(s.get('test'))} | {fmt(r['complete_ratio'], 3)} | {fmt(r['mean_trial_over_pass'], 3)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default="tpe,gp,random")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calibrations", default="clusters", help="comma-separated: clusters, random")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--checkpoints", default="10,20,40")
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--val-windows", type=int, default=24)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--storage", default="sqlite:///runs/bench-search.db")
    parser.add_argument("--json", default="runs/bench-search.json")
    args = parser.parse_args()
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    Path("runs").mkdir(exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        reference, session = None, None
        for calibration in args.calibrations.split(","):
            for sampler in args.samplers.split(","):
                job = SearchJob(model="smollm2-135m", target=0.2, trials=args.trials, sampler=sampler, seed=seed,
                                pool_size=args.pool_size, val_windows=args.val_windows,
                                test_windows=args.test_windows, space=SearchSpace(subset_mode=calibration))
                session = session or open_session(job)
                # GP/BoTorch studies complete stopped trials with estimates (see objective.paired_estimate)
                flavour = f"{sampler}-est" if sampler in ESTIMATING_SAMPLERS else sampler
                name = f"bench-{flavour}-{calibration}-s{seed}-t{args.trials}"
                study = run_one(job, name, args.storage, session, reference)
                reference = reference or study
                rows.append({"sampler": sampler, "calibration": calibration, "seed": seed,
                             **summarise(study, checkpoints)})
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, checkpoints, "python bench/search.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
