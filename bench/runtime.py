"""What pruning buys where small models are deployed: GGUF exports measured in llama.cpp.

SmolLM2-135M unpruned, LLM-Pruner's default, and the best searched model (width only: ``depth`` off; width +
depth: the default space; with ``--min-speedup X`` also width + depth chosen among the models predicted to decode
X times as fast, ``SearchJob.min_speedup``) at each target ratio, each written as GGUF in f16 and in q4_k_m
(llama.cpp's own quantizer). For each file: its size; perplexity on the test parts of the three built-in sources
(32 windows of 128 tokens each), in llama.cpp and, for the same model before conversion, in transformers (fp32)
side by side; decode and prefill tokens/s in llama.cpp, every file measured once per round over ``--repeats``
interleaved rounds (medians and ranges). LLM-Pruner's default is scored over its 3 calibration draws (their mean is the
reference; its speed is one draw's: the draws share their shapes). The searches: ``--trials`` searched trials at
seed 0 with the defaults (calibrated and validated on books and wiki, news held out), their choice by
validation alone; nothing here is tuned on the figures.

    python bench/runtime.py                     # 20% and 40%, 16 trials each: about an hour on 2 cores
    python bench/runtime.py --ratios 0.4 --trials 12 --min-speedup 1.5   # issue 30's speed target
    python bench/runtime.py --table-only        # the table of what ran (runs/bench-runtime/results.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from adapruner.data import load_source
from adapruner.evaluate import perplexity
from adapruner.export import load_pruned, save_pruned
from adapruner.inference_cost import NOISY, ratio_spread
from adapruner.llama_runtime import gguf_perplexity, measure_gguf_interleaved
from adapruner.models import builtin_checkpoint
from adapruner.search import SearchJob, SearchSpace, baseline_config, open_session, run_search
from adapruner.search.record import TrialKey
from adapruner.to_gguf import write_gguf

MODEL = "smollm2-135m"
SOURCES = ("builtin:books", "builtin:wiki", "builtin:news")
QUANTS = ("f16", "q4_k_m")
DRAWS = 3


def test_windows(session, per_source: int) -> torch.Tensor:
    return torch.cat([session.source_windows(load_source(s), "test")[:per_source] for s in SOURCES])


def models_at(ratio: float, args, session, out: Path, predicted: dict) -> dict[str, list[Path]]:
    """Each model's folder(s) at ``ratio``: several for LLM-Pruner's draws (``predicted``: the floor's searches'
    predicted speed-ups, filled in)."""
    models = {f"llm-pruner {ratio:.0%}": []}
    for draw in range(DRAWS):
        pruned, _ = session.prune(baseline_config("llm-pruner", session, seed=0, draw=draw, target=ratio), ratio)
        models[f"llm-pruner {ratio:.0%}"].append(save_pruned(pruned, session.tokenizer,
                                                             out / f"llm-pruner-r{ratio:g}-draw{draw}"))
    variants = [("width", False, None), ("width+depth", True, None)]
    if args.min_speedup is not None:
        variants.append((f"width+depth floor {args.min_speedup:g}x", True, args.min_speedup))
    for variant, depth, floor in variants:
        # no baselines in the study: LLM-Pruner's draws are built and scored here, on the same windows as the rest
        job = SearchJob(model=MODEL, target=ratio, trials=args.trials, seed=0, space=SearchSpace(depth=depth),
                        baselines=(), measure_cost=False, min_speedup=floor)
        name = f"runtime-r{ratio:g}-{variant.replace(' ', '-')}"
        started = time.perf_counter()
        result = run_search(job, f"sqlite:///{out / 'studies.db'}", name, session=session, out_dir=out / name,
                            artifact_dir=out / "artifacts", progress=False)
        print(f"search  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        models[f"best {variant} {ratio:.0%}"] = [out / name / "model"]
        if floor is not None:  # what the search predicted, beside what is measured below
            chosen = result.best_trial
            predicted[f"best {variant} {ratio:.0%}"] = chosen.user_attrs.get(TrialKey.SPEEDUP) if chosen else None
    return models


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = open_session(SearchJob(model=MODEL), progress=False)
    windows = test_windows(session, args.windows)
    models, predicted = {"unpruned": [builtin_checkpoint(MODEL)]}, {}
    for ratio in args.ratios:
        models |= models_at(ratio, args, session, out, predicted)
    results, files = {}, {}
    for label, folders in models.items():
        # ours: transformers in fp32 on the weights each GGUF is written from (an export's dtype, bf16 for the best)
        ours = [perplexity(load_pruned(f, "cpu", "float32")[0] if f != models["unpruned"][0] else session.model,
                           windows, progress=False).ppl for f in folders]
        entry = {"ours_ppl": statistics.mean(ours), "ours_ppl_draws": ours, "quants": {}}
        for quant in QUANTS:
            paths = [write_gguf(folder, out / "gguf" / f"{label.replace(' ', '_')}-{i}-{quant}.gguf", quant,
                                progress=False) for i, folder in enumerate(folders)]
            theirs = [gguf_perplexity(path, windows, threads=args.threads).ppl for path in paths]
            entry["quants"][quant] = {"file_mb": paths[0].stat().st_size / 2**20,
                                      "llama_cpp_ppl": statistics.mean(theirs), "llama_cpp_ppl_draws": theirs}
            files[f"{label} {quant}"] = paths[0]
        results[label] = entry
        print(f"scored  {label}", file=sys.stderr, flush=True)
    costs, rounds = measure_gguf_interleaved(files, repeats=args.repeats, threads=args.threads)
    for quant in QUANTS:
        spread = ratio_spread([{k: v for k, v in r.items() if k.endswith(quant)} for r in rounds], f"unpruned {quant}")
        for label in results:
            cost, key = costs[f"{label} {quant}"], f"{label} {quant}"
            results[label]["quants"][quant] |= {
                "decode": cost.decode_tokens_per_s, "decode_range": cost.decode_range,
                "prefill": cost.prefill_tokens_per_s["1x128"], "prefill_range": cost.prefill_range["1x128"],
                "decode_x": spread[key]["decode"], "prefill_x": spread[key]["prefill_1x128"],
                "parameters": cost.parameters}
    record = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "threads": costs[
        next(iter(costs))].threads, "repeats": args.repeats, "trials": args.trials, "ratios": args.ratios,
        "models": results, "predicted_speedup": predicted}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    return record


def table(record: dict) -> str:
    lines = [f"Perplexity on {record['windows']} test windows of {record['seq_len']} tokens (books, wiki, news); "
             f"speed in llama.cpp on {record['threads']} threads, medians of {record['repeats']} interleaved rounds "
             f"(range); x: the ratio to the unpruned model of the same type within each round (range; noisy when the "
             f"range is over {NOISY:.0%} of it).", "",
             "| model | type | params | file MB | ppl, ours (fp32) | ppl, llama.cpp | decode tok/s | decode x "
             "| prefill tok/s | prefill x |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(spread: dict) -> str:
        text = f"{spread['median']:.2f} ({spread['low']:.2f}-{spread['high']:.2f})"
        return text + " noisy" if spread["noisy"] else text

    for label, entry in record["models"].items():
        for quant, q in entry["quants"].items():
            lines.append(
                f"| {label} | {quant} | {q['parameters'] / 1e6:.1f}M | {q['file_mb']:.1f} | {entry['ours_ppl']:.2f} | "
                f"{q['llama_cpp_ppl']:.2f} | {q['decode']:.1f} ({q['decode_range'][0]:.1f}-{q['decode_range'][1]:.1f})"
                f" | {ratio(q['decode_x'])} | {q['prefill']:.0f} ({q['prefill_range'][0]:.0f}-"
                f"{q['prefill_range'][1]:.0f}) | {ratio(q['prefill_x'])} |")
    for label, speedup in record.get("predicted_speedup", {}).items():
        lines.append(f"\n{label}: predicted decode speed-up {speedup:.2f}x by the search's decode-time model "
                     "(q4_k_m in llama.cpp), against the measured `decode x` of its q4_k_m row above.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.4])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--windows", type=int, default=32, help="test windows per source")
    parser.add_argument("--min-speedup", type=float, default=None,
                        help="also a width + depth search with this floor on the decode speed-up "
                        "(SearchJob.min_speedup)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-runtime")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    path = Path(args.out) / "results.json"
    record = json.loads(path.read_text()) if args.table_only else run(args)
    print(table(record))


if __name__ == "__main__":
    main()
