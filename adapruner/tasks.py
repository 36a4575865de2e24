"""Downstream accuracy through EleutherAI's lm-evaluation-harness, on the loaded module as it is.

A pruned model whose layers differ in size cannot be rebuilt by a plain ``from_pretrained``, so the
harness gets the module itself (``HFLM(pretrained=model)``), on the model's own device and dtype.

Hub tasks (``piqa``, ``hellaswag``, ...) work where their data can be fetched. Two built-in tasks need
nothing from a hub: they are lm-eval task configs over JSONL files written into the cache from the
*test* part of ``builtin:books`` (a novel no calibration or validation touches), seeded:

- ``books-cloze``: a passage and four candidate next sentences, one true, three drawn from elsewhere
  in the same novel, of about the same length (multiple choice, chance 0.25). Its headline accuracy
  is ``acc_mutual_info``: each choice scored by how much the passage raises its log-likelihood, since
  a plain sum favours whichever sentence is most likely on its own (SmolLM2-135M: 0.29 ``acc``,
  0.63 ``acc_mutual_info`` on 100 items).
- ``books-lastword``: a passage whose last word is to be predicted (LAMBADA-style; accuracy of the
  greedy continuation and its perplexity).

Each result records the sha256 of its task's data, so numbers from different data never mix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .cache import cache_dir
from .data.sources import load_source
from .device import eval_mode
from .errors import AdaPrunerError
from .quiet import output_to

logger = logging.getLogger(__name__)

BUILTIN_TASKS = ("books-cloze", "books-lastword")
TASKS_VERSION = 2  # bump when the generation below changes: the cache folder is keyed by it
ITEMS = 500  # per built-in task
SEED = 1234

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'’”]?\s+(?=[\"'‘“A-Z])")


@dataclass(frozen=True)
class TaskResult:
    """One task's score: ``metrics`` maps a metric (``acc``, ``acc_norm``, ``perplexity``) to its value
    and ``stderr`` to its standard error; ``error`` is set (and ``metrics`` empty) when the task failed."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    samples: int = 0
    data_sha256: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]


def cloze_items(documents: Sequence[str], n: int = ITEMS, seed: int = SEED) -> list[dict]:
    """``n`` multiple-choice items: the first sentences of a paragraph, then its next sentence among
    three sentences drawn from other paragraphs of the same documents."""
    rng = random.Random(seed)
    paragraphs = [_sentences(p) for d in documents for p in d.split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) >= 3]
    pool = [s for p in paragraphs for s in p if 4 <= len(s.split()) <= 40]
    items = []
    for index in rng.sample(range(len(paragraphs)), min(n, len(paragraphs))):
        sentences = paragraphs[index]
        cut = rng.randrange(2, len(sentences))
        context, true = " ".join(sentences[:cut][-4:]), sentences[cut]
        # Distractors about as long as the true sentence: a summed log-likelihood favours short choices,
        # and the task is to tell which sentence follows, not which is shortest.
        words = len(true.split())
        near = [s for s in pool if abs(len(s.split()) - words) <= max(2, words // 4) and s not in sentences]
        distractors = rng.sample(sorted(set(near)), 3) if len(set(near)) >= 3 else []
        while len(distractors) < 3:
            candidate = rng.choice(pool)
            if candidate not in sentences and candidate not in distractors:
                distractors.append(candidate)
        choices = [true, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true)})
    return items


def lastword_items(documents: Sequence[str], n: int = ITEMS, seed: int = SEED) -> list[dict]:
    """``n`` passages of 2-4 whole sentences whose last word (3+ letters) is the target."""
    rng = random.Random(seed)
    candidates = []
    for document in documents:
        for paragraph in document.split("\n\n"):
            sentences = _sentences(paragraph)
            for end in range(2, len(sentences) + 1):
                passage = " ".join(sentences[max(0, end - 4):end])
                match = re.fullmatch(r"(.*\S)\s+([A-Za-z]{3,})[.!?][\"'’”]?", passage, flags=re.S)
                if match and len(passage.split()) >= 30:
                    candidates.append({"context": match.group(1), "target": match.group(2)})
    return rng.sample(candidates, min(n, len(candidates)))


_CONFIGS = {
    "books-cloze": {
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_mutual_info", "aggregation": "mean", "higher_is_better": True}],
    },
    "books-lastword": {
        "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
}


def task_config(name: str, data_file: Path) -> dict:
    """An lm-eval task config (what its YAML files hold) over one local JSONL file."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", **_CONFIGS[name], "metadata": {"version": TASKS_VERSION}}


def builtin_task_data(folder: Path | None = None) -> dict[str, Path]:
    """Write (once) the built-in tasks' JSONL files; their paths by task name."""
    folder = folder or cache_dir(f"tasks/v{TASKS_VERSION}")
    paths = {name: folder / f"{name}.jsonl" for name in BUILTIN_TASKS}
    if all(p.is_file() for p in paths.values()):
        return paths
    documents = load_source("builtin:books").part("test")
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in (("books-cloze", cloze_items(documents)), ("books-lastword", lastword_items(documents))):
        part = paths[name].with_suffix(".part")
        part.write_text("".join(json.dumps(item) + "\n" for item in items))
        part.replace(paths[name])
    return paths


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tasks(names: Sequence[str], local: dict[str, Path] | None = None) -> None:
    """Refuse unknown task names before any model loads (AdaPrunerError naming how to list them)."""
    known = set(BUILTIN_TASKS) | set(local or {})
    unknown = [n for n in names if n not in known and n not in hub_task_names()]
    if unknown:
        raise AdaPrunerError(f"unknown task {', '.join(map(repr, unknown))}: "
                             "`adapruner eval --list-tasks` lists them")


@functools.cache
def task_manager(hub: bool = True):
    """lm-eval's task registry, read once per process; ``hub`` False: without lm-eval's own tasks, whose index
    (every task's YAML, about 14,000 files) takes seconds to build and is needed only for a hub task."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=hub)


def hub_task_names() -> frozenset[str]:
    """Every task lm-eval knows."""
    return frozenset(task_manager().all_tasks)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    local: dict[str, Path] | None = None,
    log: Path | None = None,
) -> list[TaskResult]:
    """Score ``model`` on each task with ``lm_eval.simple_evaluate``, one task at a time, so a task whose
    data cannot be fetched fails alone (its ``error`` says why) and the others still run. ``log``: a file
    lm-evaluation-harness's own progress bars, prints and warnings go to (appended) instead of the console.

    ``local`` maps further task names to JSONL files in a built-in task's format (``books-cloze``'s,
    or ``books-lastword``'s when the name ends in ``lastword``): the tests' tiny tasks.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # hub tasks fail fast where there is no network
    # lm-eval bootstraps a perplexity's stderr in a forked process pool whose workers can outlive this
    # process (seen: a worker's children kept its stdout open after it exited); one process does it too.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    files = dict(local or {})
    if any(t in BUILTIN_TASKS for t in tasks):
        files.update({k: v for k, v in builtin_task_data().items() if k not in files})
    hub = any(name not in files for name in tasks)
    results = []
    # lm-eval's wrapper puts the model in eval mode too: inside eval_mode, so undone
    with eval_mode(model), output_to(log, loggers=("lm_eval",)):
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                       device=str(next(model.parameters()).device))
        for name in tasks:
            if name in files:
                kind = name if name in _CONFIGS else ("books-lastword" if name.endswith("lastword") else "books-cloze")
                config = {**task_config(kind, files[name]), "task": name}
                task, digest = config, sha256_of(files[name])
            else:
                task, digest = name, None
            try:
                out = simple_evaluate(model=wrapped, tasks=[task], limit=limit, num_fewshot=num_fewshot,
                                      task_manager=task_manager(hub), log_samples=False, bootstrap_iters=1000,
                                      verbosity="ERROR")
            except Exception as exc:  # noqa: BLE001 -- one task's failure (its data, say) is that task's result
                logger.warning("task %s failed: %s", name, exc)
                results.append(TaskResult(name, {}, {}, error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            results.append(_result(name, out, digest))
    return results


def _result(name: str, out: dict, digest: str | None) -> TaskResult:
    scores = out["results"][name]
    metrics, stderr = {}, {}
    for key, value in scores.items():
        if key == "alias" or key.startswith("sample_len") or not isinstance(value, int | float):
            continue
        metric, _, _filter = key.partition(",")
        if metric.endswith("_stderr"):
            if isinstance(value, float) and math.isfinite(value):
                stderr[metric.removesuffix("_stderr")] = value
        else:
            metrics[metric] = float(value)
    samples = out.get("n-samples", {}).get(name, {}).get("effective", 0)
    return TaskResult(name, metrics, stderr, int(samples), digest)


def headline_metric(metrics: Mapping[str, float]) -> str | None:
    """The metric a task's accuracy is reported by: ``acc_mutual_info`` where the task has it (the
    built-in cloze), else ``acc``; None for a task that failed."""
    return next((m for m in ("acc_mutual_info", "acc") if m in metrics), None)


def headline(result: TaskResult) -> str | None:
    return headline_metric(result.metrics)


def mean_accuracy(results: Sequence[TaskResult]) -> float | None:
    """Mean over tasks of each task's headline accuracy, the field's summary figure."""
    accuracies = [r.metrics[m] for r in results if (m := headline(r)) is not None]
    return sum(accuracies) / len(accuracies) if accuracies else None


def accuracy_stderr(result: TaskResult) -> float | None:
    """The standard error of a task's headline accuracy: lm-eval's, else the binomial one from its items."""
    metric = headline(result)
    if metric is None:
        return None
    if metric in result.stderr:
        return result.stderr[metric]
    p = result.metrics[metric]
    return math.sqrt(p * (1 - p) / result.samples) if result.samples else None


def mean_accuracy_stderr(results: Sequence[TaskResult]) -> float | None:
    """The standard error of :func:`mean_accuracy` (tasks scored on their own items: errors add in quadrature)."""
    errors = [accuracy_stderr(r) for r in results if headline(r) is not None]
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def ratio_stderr(a: float, a_se: float | None, b: float, b_se: float | None) -> float | None:
    """The standard error of ``a / b`` (first-order, as if independent: for two models scored on the same items
    this over-states it, never under-states)."""
    if a_se is None or b_se is None or not a or not b:
        return None
    return abs(a / b) * math.sqrt((a_se / a) ** 2 + (b_se / b) ** 2)
