"""How the statistics pass, the cached statistics and a trial grow with the model: real shapes, random weights.

Real weights of billion-parameter models cannot be downloaded here, but a model built at random from a
published config (dimensions and GQA as released) costs the same time and memory as the real one. For
each shape, on this machine's device:

- the statistics pass (one forward and backward per pool sample): seconds per sample, and its peak
  memory as the weights plus how far memory rose (RSS high-water mark on the CPU, the allocator's peak on
  CUDA), against the target ``<= 2 x weights + one sample's activations``, the bound measured as the peak
  of one plain forward and backward of one sample (every weight's gradient included);
- the cached statistics: bytes per pool sample on disk, and per prunable unit (attention group rows and
  columns, MLP channels), which is what they should grow with, not parameters;
- the cached statistics as a job keeps them: bf16 rows, written to the cache and memory-mapped;
- what a job computes once for all its trials (the weight-only unit statistics), apart from the trials;
- two trials of the default search space (importance from the mapped statistics, plan, pruned copy that
  shares what it does not cut, evaluation of the validation windows: a job's default, 32 of each of its
  two sources, ``--sources`` and ``--val-windows`` to change them), as the objective runs them: each
  phase's seconds of the second trial, each trial's time over one more evaluation pass of its pruned
  model (target <= 1.3), and the second trial's peak memory above the dense model.

    python bench/scale.py                                   # 135M, 1B, 1.5B shapes, fp32 on the CPU
    python bench/scale.py --shapes llama-3.2-3b --dtype bfloat16
    python bench/scale.py --shapes llama-3.1-8b --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from adapruner.data import load_source
from adapruner.data.windows import build_pool
from adapruner.device import resolve_device, resolve_dtype
from adapruner.evaluate import window_losses
from adapruner.importance import Mixture
from adapruner.inference_cost import PeakMemory
from adapruner.models import builtin_checkpoint
from adapruner.prune import prune_model
from adapruner.search.job import SearchJob
from adapruner.search.space import DEFAULT_METRICS
from adapruner.session import PruneConfig, PruningSession
from adapruner.statistics import PoolStatistics, collect_statistics

# Dimensions as published (config.json of each release); random weights.
SHAPES = {
    "tiny": ("llama", dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=2048, vocab_size=49152, tie_word_embeddings=True)),  # dry runs
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, head_dim=64,
                                   tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True, use_sliding_window=False)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, head_dim=128,
                                   tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                   tie_word_embeddings=False)),
}


def random_model(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    model_type, dims = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **dims, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_random(shape: str, folder: Path, tokenizer, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A checkpoint folder of ``shape`` with random weights and ``tokenizer``: a model any command can load."""
    model = random_model(shape, dtype, torch.device("cpu"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(shape: str, args, tokenizer, sources) -> dict:
    device, dtype = resolve_device(args.device), None
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    model = random_model(shape, dtype, device)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shares = [args.samples // len(sources) + (i < args.samples % len(sources)) for i in range(len(sources))]
    pool = build_pool(tokenizer, list(zip(sources, shares, strict=True)), args.seq_len)
    session = PruningSession(model, tokenizer, pool, sources, max_eval_windows={"validation": args.val_windows},
                             progress=False, cache_statistics=False)
    # -- the bound: one plain forward and backward of one sample (weights + their gradients + its activations)
    memory = PeakMemory(device)
    ids = pool.windows[:1].to(device)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    bare_growth = memory.growth_bytes()
    model.zero_grad(set_to_none=True)
    # -- the statistics pass
    memory = PeakMemory(device)
    start = time.perf_counter()
    stats = collect_statistics(model, pool.windows, progress=False)
    stats_seconds = time.perf_counter() - start
    stats_growth = memory.growth_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        # as a job keeps them: written to the cache, then mapped (a trial reads its subset's rows only)
        stats.save(Path(tmp) / "s.safetensors")
        stats_file = (Path(tmp) / "s.safetensors").stat().st_size
        del stats
        session.__dict__["statistics"] = PoolStatistics.load(Path(tmp) / "s.safetensors")
        structure = session.structure
        units = sum(s.n_groups * (2 * s.n_rep + 2) * s.head_dim + 3 * s.n_channels for s in structure.layers)
        # -- once per job, not per trial: the weight-only unit statistics every trial reuses
        start = time.perf_counter()
        session.weight_summary  # noqa: B018
        once = time.perf_counter() - start
        windows = session.windows("validation")
        trials = [trial(session, windows, args, subset) for subset in (range(len(pool)), range(0, len(pool), 2))]
    phases, evaluation, trial_growth, pruned_params, val_loss = trials[-1]
    row = {
        "shape": shape, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "params": params, "weight_bytes": weight_bytes, "build_seconds": built,
        "samples": args.samples, "seq_len": args.seq_len, "stats_seconds_per_sample": stats_seconds / args.samples,
        "stats_peak_bytes": weight_bytes + (stats_growth or 0), "stats_peak_over_weights":
            (weight_bytes + (stats_growth or 0)) / weight_bytes,
        "bound_bytes": weight_bytes + (bare_growth or 0),  # 2 x weights + one sample's activations, measured
        "stats_peak_over_bound": (weight_bytes + (stats_growth or 0)) / (weight_bytes + (bare_growth or 0)),
        "stats_bytes_per_sample": stats_file / args.samples, "prunable_units": units,
        "stats_bytes_per_sample_per_unit": stats_file / args.samples / units,
        "once_per_job_seconds": once, "trial_phases": phases, "evaluation_seconds": evaluation,
        "val_windows": int(windows.shape[0]), "trial_over_evaluation": sum(phases.values()) / evaluation,
        "first_trial_over_evaluation": sum(trials[0][0].values()) / trials[0][1],
        "trial_growth_bytes": trial_growth, "pruned_params": pruned_params, "val_loss": val_loss,
    }
    del session, model
    return row


def trial(session: PruningSession, windows: torch.Tensor, args, subset) -> tuple:
    """One trial of the default space on ``subset``, as the objective runs it: (phase seconds, the seconds of
    one more evaluation pass of the same pruned model, the trial's memory growth, pruned parameters, loss)."""
    config = PruneConfig(Mixture({m: 1.0 for m in DEFAULT_METRICS}, "sum"), tuple(subset))
    memory = PeakMemory(next(session.model.parameters()).device)
    phases = {}
    start = time.perf_counter()
    scores = session.importance(config)
    phases["importance"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = session.plan(config, args.ratio, scores)
    phases["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    pruned = prune_model(session.model, plan, share_unchanged=True)
    phases["prune"] = time.perf_counter() - start
    start = time.perf_counter()
    losses = [loss for _, loss in window_losses(pruned, windows, args.batch_size)]
    phases["evaluation"] = time.perf_counter() - start
    growth = memory.growth_bytes()
    start = time.perf_counter()  # one more evaluation pass of the same pruned model: the unit of a trial's cost
    for _ in window_losses(pruned, windows, args.batch_size):
        pass
    evaluation = time.perf_counter() - start
    return phases, evaluation, growth, sum(p.numel() for p in pruned.parameters()), sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b,qwen2.5-1.5b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=2, help="pool samples in the statistics pass")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sources", default=",".join(SearchJob.calibration),
                        help="calibration and validation texts (default: a job's)")
    parser.add_argument("--val-windows", type=int, default=SearchJob.val_windows, help="per source, as a job's")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the built-in model's)")
    parser.add_argument("--json", default="runs/scale.json")
    parser.add_argument("--table", action="store_true", help="only print the table of what --json holds")
    args = parser.parse_args()
    if args.table:
        return print_table(json.loads(Path(args.json).read_text()), args.batch_size)
    torch.set_num_threads(args.threads)
    # ids < every shape's vocabulary; a folder of its files where the built-in model cannot be fetched (a GPU machine)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or builtin_checkpoint("smollm2-135m"))
    sources = [load_source(spec) for spec in args.sources.split(",")]
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.is_file() else []
    for shape in args.shapes.split(","):
        row = measure(shape, args, tokenizer, sources)
        rows = [r for r in rows if (r["shape"], r["dtype"], r["device"]) != (row["shape"], row["dtype"], row["device"])]
        rows.append(row)
        path.write_text(json.dumps(rows, indent=1))
        gib = 2**30
        print(f"{shape}: {row['params'] / 1e9:.2f}B params, stats {row['stats_seconds_per_sample']:.1f} s/sample, "
              f"peak {row['stats_peak_bytes'] / gib:.2f} GiB = {row['stats_peak_over_weights']:.2f}x weights = "
              f"{row['stats_peak_over_bound']:.2f}x the bound, "
              f"{row['stats_bytes_per_sample'] / 2**20:.2f} MiB/sample ({row['stats_bytes_per_sample_per_unit']:.1f} "
              f"B/unit); trial {sum(row['trial_phases'].values()):.1f}s = {row['trial_over_evaluation']:.2f}x eval "
              f"{row['evaluation_seconds']:.1f}s, +{(row['trial_growth_bytes'] or 0) / gib:.2f} GiB", flush=True)
    print_table(rows, args.batch_size)


def predicted_trial_bytes(row: dict, batch_size: int) -> float:
    """The trial's memory by the formula: the copy's own tensors, its kept projections (``P_proj - r P``
    parameters: whatever is cut is cut from projections), and the evaluation's logits twice in fp32 (the
    logits and their log-softmax), which dominate a batch's activations."""
    _, dims = SHAPES[row["shape"]]
    hidden, vocab, layers = dims["hidden_size"], dims["vocab_size"], dims["num_hidden_layers"]
    shared = vocab * hidden * (1 if dims.get("tie_word_embeddings") else 2) + hidden * (2 * layers + 1)
    kept_projections = row["pruned_params"] - shared
    return kept_projections * row["weight_bytes"] / row["params"] + 2 * batch_size * row["seq_len"] * vocab * 4


def print_table(rows: list[dict], batch_size: int) -> None:
    gib = 2**30
    print("\n| shape | dtype | parameters | statistics s/sample | statistics peak (x weights) | peak / bound | "
          "cached MiB/sample | B/sample/unit | once per job s | importance s | plan s | prune s | evaluation s "
          "| windows | trial / evaluation (first trial) | trial +GiB (formula) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["trial_phases"]
        print(f"| {r['shape']} | {r['dtype']} | {r['params'] / 1e9:.2f}B | {r['stats_seconds_per_sample']:.1f} | "
              f"{r['stats_peak_bytes'] / gib:.2f} GiB ({r['stats_peak_over_weights']:.2f}) | "
              f"{r['stats_peak_over_bound']:.2f} | "
              f"{r['stats_bytes_per_sample'] / 2**20:.2f} | {r['stats_bytes_per_sample_per_unit']:.1f} | "
              f"{r['once_per_job_seconds']:.1f} | {p['importance']:.2f} | {p['plan']:.2f} | {p['prune']:.2f} | "
              f"{p['evaluation']:.1f} | {r['val_windows']} | "
              f"{r['trial_over_evaluation']:.2f} ({r['first_trial_over_evaluation']:.2f}) | "
              f"{(r['trial_growth_bytes'] or 0) / gib:.2f} ({predicted_trial_bytes(r, batch_size) / gib:.2f}) |")

if __name__ == "__main__":
    main()
