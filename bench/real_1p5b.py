"""The whole product on a real, trained 1.5B-parameter model: Qwen2.5-Coder-1.5B-Instruct (issue 33).

The built-in ``qwen2.5-coder-1.5b`` (fetched and converted once), pruned at ``--target`` by a search with the
defaults (calibrated and validated on books and wiki, news held out) of ``--trials`` searched trials against
LLM-Pruner's default (the mean of its 3 draws) and FLAP, in ``--dtype`` on this machine's device, with the built-in
tasks on ``--task-limit`` items. Measured around it:

- the statistics pass (in this process, before the search, which then reads it from the cache): seconds and peak
  resident memory against the weights;
- one evaluation pass of the unpruned model over the search's validation windows, against each completed searched
  trial's time (importance, plan, prune, repair, validation; target <= 1.3x);
- the search and ``adapruner prune`` as their own processes: wall time and peak resident memory (``/usr/bin/time``);
- the exported best model reloaded with transformers alone, its logits against the pruned model rebuilt from its
  configuration.

    python bench/real_1p5b.py                           # 24 trials at 20%, bf16 on the CPU
    python bench/real_1p5b.py --table-only              # the table of what ran (runs/bench-1p5b/results.json)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from transformers import AutoModelForCausalLM

from adapruner.device import release_memory
from adapruner.evaluate import window_losses
from adapruner.inference_cost import PeakMemory
from adapruner.search import SearchJob, open_session
from adapruner.search.record import StudyKey, TrialKey
from adapruner.search.selection import chosen_trial
from adapruner.session import PruneConfig

MODEL = "qwen2.5-coder-1.5b"
PHASES = ("importance", "plan", "prune", "repair", "validation")
ADAPRUNER = str(Path(sys.executable).with_name("adapruner"))  # the command beside this interpreter


def timed_process(argv: list[str], log: Path) -> dict:
    """Run ``argv`` under ``/usr/bin/time -v``: its wall seconds and peak resident memory."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{Path(argv[0]).name} {argv[1]} failed ({proc.returncode}); see {log}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": peak}


def in_process(job: SearchJob, dtype: str, path: Path) -> dict:
    """The statistics pass and one evaluation pass, measured here (once: kept in ``path`` for a re-run, whose
    search process resumes its study)."""
    if path.exists():
        return json.loads(path.read_text())
    session = open_session(job, dtype=dtype, progress=False)
    weights = sum(p.numel() * p.element_size() for p in session.model.parameters())
    cached = session.statistics_path.is_file()  # then the pass is not timed: only read
    memory, started = PeakMemory(torch.device("cpu")), time.perf_counter()
    session.statistics  # noqa: B018  (computed and cached here; the search process reads the cache)
    stats = {"seconds": time.perf_counter() - started, "peak_bytes": memory.peak_bytes(weights),
             "samples": len(session.pool), "cached": cached}
    windows = session.windows("validation")
    started = time.perf_counter()
    for _ in window_losses(session.model, windows, 4):
        pass
    measured = {"weights_bytes": weights, "statistics": stats, "evaluation_seconds": time.perf_counter() - started,
                "validation_windows": int(windows.shape[0])}
    path.write_text(json.dumps(measured))
    return measured


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = SearchJob(model=MODEL, target=args.target, trials=args.trials)
    # This process lets go of its model before the search starts: on a 24 GB machine, the search's float16 backward
    # (LLM-Pruner's draws) beside a second copy of the weights here was killed for memory.
    measured = in_process(job, args.dtype, out / "in-process.json")
    release_memory()
    evaluation = measured["evaluation_seconds"]
    storage = f"sqlite:///{out / 'studies.db'}"
    search = timed_process(
        [ADAPRUNER, "search", "--model", MODEL, "--target", str(args.target), "--trials",
         str(args.trials), "--dtype", args.dtype, "--baselines", "llm-pruner,flap", "--tasks",
         "books-cloze,books-lastword", "--task-limit", str(args.task_limit), "--cost-rounds", "3",
         "--storage", storage, "--study", "real-1p5b", "--out", str(out / "search")], out / "search.log")
    study = optuna.load_study(study_name="real-1p5b", storage=storage)
    prune = timed_process(
        [ADAPRUNER, "prune", "--model", MODEL, "--ratio", str(args.target), "--metric", "flap",
         "--scope", "global", "--repair", "pool", "--dtype", args.dtype, "--out", str(out / "prune")],
        out / "prune.log")
    session = open_session(job, dtype=args.dtype, progress=False)
    return {"target": args.target, "trials": args.trials, "dtype": args.dtype, **measured,
            "search": search, "prune": prune, "study": summarise(study, evaluation),
            "reload": reload_check(session, study, out / "search" / "model", args.target)}


def summarise(study: optuna.Study, evaluation: float) -> dict:
    """Scores of the unpruned model, the baselines and the chosen trial; trial time against one evaluation."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if TrialKey.BASELINE not in t.user_attrs and t.state.name == "COMPLETE"
                and not t.user_attrs.get(TrialKey.ESTIMATED)]
    seconds = [sum(t.user_attrs[TrialKey.SECONDS].get(p, 0.0) for p in PHASES) for t in complete]
    chosen = chosen_trial(study)  # with the test scores the selection measured

    def scores(t) -> dict:
        return {"validation": t.value, "test": t.user_attrs.get(TrialKey.TEST_PPL),
                "heldout": t.user_attrs.get(TrialKey.HELDOUT_PPL)}

    baselines = {}
    for t in trials:
        name = t.user_attrs.get(TrialKey.BASELINE)
        if name and t.state.name == "COMPLETE":
            baselines.setdefault(name, []).append(scores(t))
    unpruned = study.user_attrs[StudyKey.UNPRUNED]
    return {"unpruned": {"validation": unpruned["validation"], "test": unpruned["test"],
                         "heldout": unpruned.get("heldout")},
            "baselines": {name: {k: statistics.mean(d[k] for d in draws) for k in draws[0]} | {"draws": draws}
                          for name, draws in baselines.items()},
            "chosen": {"trial": chosen.number, "baseline": chosen.user_attrs.get(TrialKey.BASELINE),
                       "config": chosen.user_attrs[TrialKey.CONFIG], **scores(chosen)},
            "trial_seconds": seconds, "trial_over_evaluation": [s / evaluation for s in seconds],
            "tasks": study.user_attrs.get(StudyKey.TASKS), "cost": study.user_attrs.get(StudyKey.INFERENCE_COST)}


def reload_check(session, study: optuna.Study, folder: Path, target: float) -> dict:
    """The export reloaded with transformers alone, against the chosen configuration rebuilt here."""
    chosen = chosen_trial(study)
    rebuilt = session.prune(PruneConfig.from_dict(chosen.user_attrs[TrialKey.CONFIG]), target)[0]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=rebuilt.dtype).eval()
    ids = session.windows("test")[:2]
    with torch.no_grad():
        a, b = rebuilt(input_ids=ids).logits.float(), loaded(input_ids=ids).logits.float()
    return {"max_abs_logit_diff": float((a - b).abs().max()), "identical": bool(torch.equal(a, b))}


def table(r: dict) -> str:
    s, gb = r["study"], 2**30
    ratio = s["trial_over_evaluation"]
    rows = [("unpruned", s["unpruned"]), *((f"{n} (mean of {len(b['draws'])})", b) for n, b in s["baselines"].items()),
            (f"best: trial {s['chosen']['trial']}", s["chosen"])]
    lines = [f"Qwen2.5-Coder-1.5B-Instruct at {r['target']:.0%}, {r['trials']} searched trials, {r['dtype']}.", "",
             "| model | validation | test (books, wiki) | held-out (news) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {v['validation']:.2f} | {v['test']:.2f} | {v['heldout']:.2f} |" for name, v in rows]
    llm = s["baselines"].get("llm-pruner")
    if llm:
        lines.append(f"\nheld-out: best / LLM-Pruner's mean = {s['chosen']['heldout'] / llm['heldout']:.3f}")
    stats = r["statistics"]
    lines += [
        f"statistics pass: from the cache, not timed ({stats['samples']} samples)" if stats.get("cached") else
        f"statistics pass: {stats['seconds']:.0f} s for {stats['samples']} samples, peak "
        f"{stats['peak_bytes'] / gb:.2f} GB against {r['weights_bytes'] / gb:.2f} GB of weights",
        f"one evaluation pass ({r['validation_windows']} windows): {r['evaluation_seconds']:.1f} s; completed trials: "
        + (f"{statistics.median(s['trial_seconds']):.1f} s median, {statistics.median(ratio):.2f}x the evaluation "
           f"(range {min(ratio):.2f}-{max(ratio):.2f}, {len(ratio)} trials)" if ratio else "none"),
        f"search process: {r['search']['seconds'] / 60:.1f} min, peak RSS {r['search']['peak_rss_bytes'] / gb:.2f} GB; "
        f"prune process: {r['prune']['seconds'] / 60:.1f} min, peak RSS {r['prune']['peak_rss_bytes'] / gb:.2f} GB",
        f"export reloaded with transformers: identical logits {r['reload']['identical']} (max |diff| "
        f"{r['reload']['max_abs_logit_diff']:.2g})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--task-limit", type=int, default=200)
    parser.add_argument("--out", default="runs/bench-1p5b")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    path = Path(args.out) / "results.json"
    if args.table_only:
        record = json.loads(path.read_text())
    else:
        record = run(args)
        path.write_text(json.dumps(record, indent=1, default=str))
    print(table(record))


if __name__ == "__main__":
    main()
