"""Downstream accuracy of a searched study's models on lm-eval tasks: unpruned, LLM-Pruner's default and
the best searched configuration, rebuilt from the study as its search built them.

    python bench/tasks.py --study repair-plain-r0.2-s0-t16-tpe --storage sqlite:///runs/bench-repair.db

(the study: ``bench/repair.py``'s search without repair at 20%, seed 0, calibrated and validated on
``builtin:books``). The built-in tasks' text is *Persuasion*, the books test part that the study never
calibrated or validated on. Prints a markdown table: accuracy per task, mean, and mean as a share of the
unpruned model's.
"""

from __future__ import annotations

import argparse
import time

import optuna

from adapruner.search import SearchJob, baseline_config, open_session
from adapruner.search.accuracy import accuracy_table
from adapruner.search.record import StudyKey, TrialKey
from adapruner.session import PruneConfig
from adapruner.tasks import evaluate_tasks, headline, mean_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", default="sqlite:///runs/bench-repair.db")
    parser.add_argument("--tasks", default="books-cloze,books-lastword")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    job = SearchJob.from_dict(study.user_attrs[StudyKey.JOB])
    session = open_session(job, progress=False)
    tasks = args.tasks.split(",")
    best_config = PruneConfig.from_dict(study.best_trial.user_attrs[TrialKey.CONFIG])
    models = {"unpruned": lambda: session.model,
              "llm-pruner": lambda: session.prune(baseline_config("llm-pruner", session, job.seed), job.target)[0],
              f"best searched (trial {study.best_trial.number})":
                  lambda: session.prune(best_config, job.target)[0]}
    scores = {}
    for label, build in models.items():
        start = time.perf_counter()
        results = evaluate_tasks(build(), session.tokenizer, tasks, args.limit, batch_size=16)
        scores[label] = {"results": {r.task: r.to_dict() for r in results}, "mean_acc": mean_accuracy(results)}
        print(f"{label}: " + ", ".join(f"{r.task} {headline(r)} {r.metrics.get(headline(r), float('nan')):.3f} ± "
                                       f"{r.stderr.get(headline(r), float('nan')):.3f} (acc {r.metrics['acc']:.3f})"
                                       for r in results)
              + f" ({time.perf_counter() - start:.0f}s; data {results[0].data_sha256[:12]})", flush=True)
    print("\n".join(accuracy_table({"tasks": tasks, "models": scores})))


if __name__ == "__main__":
    main()
