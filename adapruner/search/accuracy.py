"""Downstream accuracy after a search: the unpruned model, every baseline and the best configuration
on the job's lm-eval tasks (``SearchJob.tasks``), recorded once with the study (user attribute
``tasks``). Perplexity stays the objective; the tasks are measured, never optimised."""

from __future__ import annotations

import logging

import optuna
from tqdm.auto import tqdm

from ..cache import cache_dir
from ..session import PruningSession
from ..tasks import (
    TaskResult,
    accuracy_stderr,
    evaluate_tasks,
    headline_metric,
    mean_accuracy,
    mean_accuracy_stderr,
    ratio_stderr,
)
from .best import UNPRUNED, compared_models
from .job import SearchJob
from .record import StudyKey

logger = logging.getLogger(__name__)


def score_tasks(study: optuna.Study, session: PruningSession, job: SearchJob, batch_size: int = 8) -> dict | None:
    """Score and record the models on ``job.tasks``; what is recorded already when another process (or a
    resume) did it. The best configuration is scored as searched, before any LoRA fine-tuning."""
    if not job.tasks:
        return None
    if StudyKey.TASKS in study.user_attrs:
        return study.user_attrs[StudyKey.TASKS]
    models = compared_models(study, session, job)
    # lm-evaluation-harness's own bars and prints go to a log the report names; --verbose shows them instead
    log = None if logger.isEnabledFor(logging.INFO) else cache_dir("logs") / f"{study.study_name}-tasks.log"
    scores = {}
    for done, (label, build) in tqdm(list(enumerate(models)), desc="tasks", unit="model", disable=not session.progress,
                                     leave=False):
        if session.on_step is not None:
            session.on_step("tasks", done, len(models))
        results = evaluate_tasks(build(), session.tokenizer, job.tasks, job.task_limit, batch_size=batch_size, log=log)
        scores[label] = {"results": {r.task: r.to_dict() for r in results}, "mean_acc": mean_accuracy(results),
                         "mean_acc_stderr": mean_accuracy_stderr(results)}
    unpruned, searched = scores[UNPRUNED], scores.get("best", {})
    retained = searched.get("mean_acc") / unpruned["mean_acc"] if unpruned["mean_acc"] and searched.get("mean_acc") \
        is not None else None
    summary = {"tasks": list(job.tasks), "limit": job.task_limit, "models": scores, "log": str(log) if log else None,
               "best_retained": retained,
               "best_retained_stderr": retained_stderr(searched, unpruned) if retained is not None else None}
    study.set_user_attr(StudyKey.TASKS, summary)
    return summary


def retained_stderr(score: dict, unpruned: dict) -> float | None:
    """The standard error of a model's mean accuracy as a share of the unpruned model's."""
    return ratio_stderr(score.get("mean_acc"), score.get("mean_acc_stderr"), unpruned.get("mean_acc"),
                        unpruned.get("mean_acc_stderr"))


def _with_error(value: float | None, stderr: float | None, percent: bool = False) -> str:
    if value is None:
        return "—"
    shown = f"{value:.1%}" if percent else f"{value:.3f}"
    if stderr is None:
        return shown
    return shown + (f" ± {stderr:.1%}" if percent else f" ± {stderr:.3f}")


def accuracy_table(summary: dict) -> list[str]:
    """Markdown: each task's headline accuracy per model (:func:`~adapruner.tasks.headline_metric`) with its
    standard error, their mean, and the mean as a share of the unpruned model's (± one standard error)."""
    tasks = summary["tasks"]
    unpruned = summary["models"]["unpruned"]
    lines = ["| model | " + " | ".join(tasks) + " | mean | of unpruned |", "|---|" + "---:|" * (len(tasks) + 2)]
    for label, score in summary["models"].items():
        cells = []
        for task in tasks:
            result = score["results"][task]
            metric = headline_metric(result["metrics"])
            if result["error"]:
                cells.append("failed")
                continue
            stderr = None if metric is None else accuracy_stderr(TaskResult(**result))
            cells.append(_with_error(None if metric is None else result["metrics"][metric], stderr))
        mean = score["mean_acc"]
        share = mean / unpruned["mean_acc"] if mean is not None and unpruned["mean_acc"] else None
        share_se = None if label == UNPRUNED else retained_stderr(score, unpruned)  # a model to itself: exactly 1
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_with_error(mean, score.get('mean_acc_stderr'))} | "
                     f"{_with_error(share, share_se, percent=True)} |")
    return lines
