"""Downstream accuracy after a search: the unpruned model, every baseline and the best configuration
on the job's lm-eval tasks (``SearchJob.tasks``), recorded once with the study (user attribute
``tasks``). Perplexity stays the objective; the tasks are measured, never optimised."""

from __future__ import annotations

import optuna

from ..session import PruningSession
from ..tasks import evaluate_tasks, headline_metric, mean_accuracy
from .best import UNPRUNED, compared_models
from .job import SearchJob
from .record import StudyKey


def score_tasks(study: optuna.Study, session: PruningSession, job: SearchJob, batch_size: int = 8) -> dict | None:
    """Score and record the models on ``job.tasks``; what is recorded already when another process (or a
    resume) did it. The best configuration is scored as searched, before any LoRA recovery."""
    if not job.tasks:
        return None
    if StudyKey.TASKS in study.user_attrs:
        return study.user_attrs[StudyKey.TASKS]
    models = compared_models(study, session, job)
    scores = {}
    for done, (label, build) in enumerate(models):
        if session.on_step is not None:
            session.on_step("tasks", done, len(models))
        results = evaluate_tasks(build(), session.tokenizer, job.tasks, job.task_limit, batch_size=batch_size)
        scores[label] = {"results": {r.task: r.to_dict() for r in results}, "mean_acc": mean_accuracy(results)}
    dense, searched = scores[UNPRUNED]["mean_acc"], scores.get("best", {}).get("mean_acc")
    summary = {"tasks": list(job.tasks), "limit": job.task_limit, "models": scores,
               "best_retained": searched / dense if dense and searched is not None else None}
    study.set_user_attr(StudyKey.TASKS, summary)
    return summary


def accuracy_table(summary: dict) -> list[str]:
    """Markdown: each task's headline accuracy per model (:func:`~adapruner.tasks.headline_metric`),
    their mean, and the mean as a share of the unpruned model's."""
    tasks = summary["tasks"]
    dense = summary["models"]["unpruned"]["mean_acc"]
    lines = ["| model | " + " | ".join(tasks) + " | mean | of unpruned |", "|---|" + "---:|" * (len(tasks) + 2)]
    for label, score in summary["models"].items():
        cells = []
        for task in tasks:
            result = score["results"][task]
            metric = headline_metric(result["metrics"])
            acc = None if metric is None else result["metrics"][metric]
            cells.append("failed" if result["error"] else "—" if acc is None else f"{acc:.3f}")
        mean = score["mean_acc"]
        share = f"{mean / dense:.1%}" if mean is not None and dense else "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'—' if mean is None else f'{mean:.3f}'} | {share} |")
    return lines
