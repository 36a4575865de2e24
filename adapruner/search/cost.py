"""What the pruned models buy, measured after a search: the unpruned model, every baseline and the best
configuration, side by side in one process on the worker's device and dtype
(:func:`~adapruner.inference_cost.measure_cost`), recorded once with the study (user attribute
``inference_cost``). Measured, never searched on."""

from __future__ import annotations

from pathlib import Path

import optuna

from ..inference_cost import InferenceCost, measure_cost, speedups
from ..models import checkpoint_folder
from ..session import PruningSession
from .best import UNPRUNED, compared_models
from .job import SearchJob
from .record import StudyKey


def measure_models(study: optuna.Study, session: PruningSession, job: SearchJob, model_dir: Path | None = None,
                   **options) -> dict | None:
    """Measure and record the models' inference cost (``options`` go to :func:`measure_cost`); what is
    recorded already when another process (or a resume) did it. Bytes on disk are those of the dense
    checkpoint and of the best's export in ``model_dir`` (the baselines are not written)."""
    if not job.measure_cost:
        return None
    if StudyKey.INFERENCE_COST in study.user_attrs:
        return study.user_attrs[StudyKey.INFERENCE_COST]
    models = compared_models(study, session, job)
    folders = {UNPRUNED: checkpoint_folder(session.model_name), "best": model_dir}
    costs: dict[str, InferenceCost] = {}
    for done, (label, build) in enumerate(models):
        if session.on_step is not None:
            session.on_step("inference cost", done, len(models))
        model = build()
        costs[label] = measure_cost(model, folder=folders.get(label), **options)
        del model  # one pruned copy at a time
    summary = {"models": {label: cost.to_dict() for label, cost in costs.items()},
               "speedups": speedups(costs, UNPRUNED)}
    study.set_user_attr(StudyKey.INFERENCE_COST, summary)
    return summary


def cost_table(summary: dict) -> list[str]:
    """Markdown: each model's parameters, decode and prefill throughput (and decode as a multiple of the
    unpruned model's) and peak memory."""
    models, ratios = summary["models"], summary["speedups"]
    first = next(iter(models.values()))
    shapes = list(first["prefill_tokens_per_s"])
    lines = [f"Measured on {first['device']} in {first['dtype']} with {first['threads']} threads, one model after "
             "another in one process: decode is greedy at batch 1 with the KV cache; prefill is one forward pass.", "",
             "| model | parameters | decode tokens/s | decode × unpruned | "
             + " | ".join(f"prefill {s} tokens/s" for s in shapes) + " | peak memory MB | on disk MB |",
             "|---|" + "---:|" * (5 + len(shapes))]
    for label, cost in models.items():
        prefill = " | ".join(f"{cost['prefill_tokens_per_s'][s]:,.0f}" for s in shapes)
        disk = "—" if cost["disk_bytes"] is None else f"{cost['disk_bytes'] / 2**20:,.1f}"
        lines.append(f"| {label} | {cost['parameters'] / 1e6:,.2f}M | {cost['decode_tokens_per_s']:,.1f} | "
                     f"{ratios[label]['decode']:.2f} | {prefill} | {cost['peak_memory_bytes'] / 2**20:,.0f} | {disk} |")
    return lines
