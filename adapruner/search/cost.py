"""What the pruned models buy, measured after a search: the unpruned model, every baseline and the best
configuration, side by side in one process on the worker's device and dtype, in interleaved rounds
(:func:`~adapruner.inference_cost.measure_interleaved`), recorded once with the study (user attribute
``inference_cost``) with each ratio's range over the rounds; where llama.cpp is installed, also the unpruned
model and the best as q4_k_m GGUF files in llama.cpp (``llama_cpp`` in that record), what a user deploys.
Measured, never searched on."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna

from ..errors import AdaPrunerError
from ..export import save_pruned
from ..inference_cost import (
    NOISY,
    available_memory,
    measure_cost,
    measure_interleaved,
    ratio_spread,
    ratio_text,
    speedups,
)
from ..llama_runtime import measure_gguf_interleaved
from ..models import checkpoint_folder
from ..session import PruningSession
from ..to_gguf import llama_cpp_module, read_layout, write_gguf
from .best import UNPRUNED, compared_models
from .job import SearchJob
from .record import StudyKey

LLAMA_CPP = "llama_cpp"  # the inference-cost record's entry for the GGUF files measured in llama.cpp
# A search's decode measurement: 64 new tokens after the 32-token prompt, in each of the job's rounds (a rate, so
# the rounds' spread says more than a longer run; `adapruner bench-model` defaults to 128)
DECODE_TOKENS = 64


def measure_models(study: optuna.Study, session: PruningSession, job: SearchJob, model_dir: Path | None = None,
                   **options) -> dict | None:
    """Measure and record the models' inference cost (``options`` go to :func:`measure_cost`, ``new_tokens``
    :data:`DECODE_TOKENS` unless given); what is recorded already when another process (or a resume) did it.
    Bytes on disk are those of the unpruned checkpoint and of the best's export in ``model_dir`` (the baselines
    are not written)."""
    if not job.measure_cost:
        return None
    if StudyKey.INFERENCE_COST in study.user_attrs:
        return study.user_attrs[StudyKey.INFERENCE_COST]
    options = {"new_tokens": DECODE_TOKENS, **options}
    compared = compared_models(study, session, job, share_unchanged=True)
    folders = {UNPRUNED: checkpoint_folder(session.model_name), "best": model_dir}
    interleaved = fits_at_once(session.model, len(compared))  # else one at a time: no rounds, no ratio ranges
    costs, models = {}, {}
    for done, (label, build) in enumerate(compared):
        if session.on_step is not None:
            session.on_step("inference cost", done, len(compared))
        if interleaved:
            models[label] = build()  # all at once, for the rounds; each shares the unpruned model's uncut tensors
        else:
            costs[label] = measure_cost(build(), folder=folders.get(label), **options)
    summary = {}
    if interleaved:
        costs, rounds = measure_interleaved(models, repeats=job.cost_rounds, folders=folders,
                                            **{"progress": session.progress, **options})
        summary = {"spread": ratio_spread(rounds, UNPRUNED), "rounds": len(rounds)}
    del models
    summary = {"models": {label: cost.to_dict() for label, cost in costs.items()},
               "speedups": speedups(costs, UNPRUNED), **summary}
    in_llama_cpp = measure_in_llama_cpp(session, dict(compared).get("best"), folders[UNPRUNED], model_dir,
                                        repeats=job.cost_rounds)
    if in_llama_cpp is not None:
        summary[LLAMA_CPP] = in_llama_cpp
    study.set_user_attr(StudyKey.INFERENCE_COST, summary)
    return summary


def measure_in_llama_cpp(session: PruningSession, build_best, unpruned_folder: Path | None, best_folder: Path | None,
                         quant: str = "q4_k_m", repeats: int = 5) -> dict | None:
    """The unpruned model and the best as ``quant`` GGUF files in llama.cpp, interleaved (what a user deploys);
    ``None`` where llama.cpp is not installed or the model has no GGUF layout here."""
    try:
        llama_cpp_module()
        read_layout(unpruned_folder) if unpruned_folder is not None else None
    except AdaPrunerError:
        return None
    if unpruned_folder is None or build_best is None:
        return None
    with tempfile.TemporaryDirectory(prefix="adapruner-gguf-") as tmp:
        best_folder = best_folder or save_pruned(build_best(), session.tokenizer, Path(tmp) / "best")
        files = {label: write_gguf(folder, Path(tmp) / f"{label}.gguf", quant, progress=False)
                 for label, folder in ((UNPRUNED, unpruned_folder), ("best", best_folder))}
        costs, rounds = measure_gguf_interleaved(files, repeats=repeats)
    return {"quant": quant, "models": {label: cost.to_dict() for label, cost in costs.items()},
            "speedups": speedups(costs, UNPRUNED), "spread": ratio_spread(rounds, UNPRUNED), "rounds": len(rounds)}


def fits_at_once(model, n_models: int) -> bool:
    """Whether ``n_models`` copies of ``model``'s weights fit in half the memory its device has free (the
    pruned copies share the uncut tensors, so this over-counts): then they are measured in rounds."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    free = available_memory(params[0].device)
    return free is None or n_models * weights < free / 2


def cost_table(summary: dict) -> list[str]:
    """Markdown: each model's parameters, decode and prefill throughput (medians, decode with its range) and
    decode as a multiple of the unpruned model's (median of the rounds' ratios, its range), and peak memory."""
    models, ratios, spread = summary["models"], summary["speedups"], summary.get("spread", {})
    first = next(iter(models.values()))
    shapes = list(first["prefill_tokens_per_s"])
    rounds = (f"medians of {summary['rounds']} interleaved rounds (each model once per round), ranges in "
              f"brackets; a ratio whose range is over {NOISY:.0%} of it is marked noisy: noise, not a result"
              if "rounds" in summary else "one model after another")
    lines = [f"Measured on {first['device']} in {first['dtype']} with {first['threads']} threads in one process, "
             f"{rounds}: decode is greedy at batch 1 with the KV cache; prefill is one forward pass.", "",
             "| model | parameters | decode tokens/s | decode × unpruned | "
             + " | ".join(f"prefill {s} tokens/s" for s in shapes) + " | peak memory MB | on disk MB |",
             "|---|" + "---:|" * (5 + len(shapes))]
    for label, cost in models.items():
        prefill = " | ".join(f"{cost['prefill_tokens_per_s'][s]:,.0f}" for s in shapes)
        disk = "—" if cost["disk_bytes"] is None else f"{cost['disk_bytes'] / 2**20:,.1f}"
        decode = f"{cost['decode_tokens_per_s']:,.1f}"
        if cost.get("decode_range"):
            decode += f" ({cost['decode_range'][0]:,.1f}-{cost['decode_range'][1]:,.1f})"
        times = ratio_text(ratios[label]["decode"], spread.get(label, {}).get("decode"))
        lines.append(f"| {label} | {cost['parameters'] / 1e6:,.2f}M | {decode} | {times} | {prefill} | "
                     f"{cost['peak_memory_bytes'] / 2**20:,.0f} | {disk} |")
    if LLAMA_CPP in summary:
        lines += ["", *llama_cpp_table(summary[LLAMA_CPP])]
    return lines


def llama_cpp_table(record: dict) -> list[str]:
    """Markdown: the unpruned model and the best as GGUF files in llama.cpp (interleaved rounds)."""
    first = next(iter(record["models"].values()))
    lines = [f"In llama.cpp, as {record['quant']} GGUF files (what `adapruner export` writes), {first['threads']} "
             f"threads, medians of {record['rounds']} interleaved rounds, ranges in brackets:", "",
             "| model | file MB | decode tokens/s | decode × unpruned | prefill tokens/s | prefill × unpruned |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, cost in record["models"].items():
        shape = next(iter(cost["prefill_tokens_per_s"]))
        spread = record["spread"].get(label, {})
        low, high = cost["decode_range"]
        lines.append(f"| {label} | {cost['disk_bytes'] / 2**20:,.1f} | {cost['decode_tokens_per_s']:,.1f} "
                     f"({low:,.1f}-{high:,.1f}) | "
                     f"{ratio_text(record['speedups'][label]['decode'], spread.get('decode'))} | "
                     f"{cost['prefill_tokens_per_s'][shape]:,.0f} | "
                     f"{ratio_text(record['speedups'][label][f'prefill_{shape}'], spread.get(f'prefill_{shape}'))} |")
    return lines
