"""``adapruner bench-model``: measured inference cost of models side by side."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import AdaPrunerError
from .args import positive


def cmd_bench_model(args: argparse.Namespace) -> int:
    from ..device import resolve_device, resolve_dtype
    from ..inference_cost import NOISY, load_measured, measure_interleaved, ratio_spread, ratio_text, speedups
    from ..models import read_model_config

    # every refusal before the first load: a bad last model should not cost the first one's measurement
    if args.new_tokens < 2:
        raise AdaPrunerError(f"--new-tokens must be at least 2 (the first comes from the prompt's forward pass), "
                             f"got {args.new_tokens}")
    repeated = sorted({name for name in args.models if args.models.count(name) > 1})
    if repeated:
        raise AdaPrunerError(f"--model {repeated[0]} is given more than once")
    if args.runtime == "llama.cpp":
        costs, rounds = measure_in_llama_cpp(args)
    else:
        resolve_dtype(args.dtype, resolve_device(args.device))
        for name in args.models:
            read_model_config(name)
        models, folders = {}, {}
        for i, name in enumerate(args.models, 1):
            print(f"bench   {i}/{len(args.models)} {name}", file=sys.stderr, flush=True)
            models[name], folders[name] = load_measured(name, device=args.device, dtype=args.dtype)
        print(f"bench   {args.repeats} interleaved rounds", file=sys.stderr, flush=True)
        costs, rounds = measure_interleaved(models, repeats=args.repeats, folders=folders,
                                            new_tokens=args.new_tokens)
    reference = args.models[0]
    ratios, spread = speedups(costs, reference), ratio_spread(rounds, reference)
    if args.json:
        print(json.dumps({"reference": reference, "models": {name: cost.to_dict() for name, cost in costs.items()},
                          "speedups": ratios, "spread": spread, "rounds": len(rounds)}, indent=1))
        return 0
    shapes = list(dict.fromkeys(shape for cost in costs.values() for shape in cost.prefill_tokens_per_s))
    width = max(len("model"), *(len(name) for name in costs))
    print(f"{'model':<{width}}  {'params':>8}  {'disk MB':>8}  "
          + "".join(f"{'prefill ' + shape:>14}  " for shape in shapes)
          + f"{'decode tok/s':>12}  {'peak MB':>8}  decode x")
    for name, cost in costs.items():
        disk = f"{cost.disk_bytes / 2**20:.1f}" if cost.disk_bytes is not None else "-"
        prefill = "".join(f"{cost.prefill_tokens_per_s[shape]:>14.1f}  " if shape in cost.prefill_tokens_per_s
                          else f"{'-':>14}  " for shape in shapes)
        print(f"{name:<{width}}  {cost.parameters / 1e6:>7.2f}M  {disk:>8}  {prefill}"
              f"{cost.decode_tokens_per_s:>12.1f}  {cost.peak_memory_bytes / 2**20:>8.1f}  "
              f"{ratio_text(ratios[name]['decode'], spread[name]['decode'])}")
    first = costs[reference]
    print(f"({first.device}, {first.dtype}, {first.threads} threads; prefill and decode in tokens/s, medians of "
          f"{len(rounds)} interleaved rounds; decode x relative to {reference}, its range in brackets, noisy when "
          f"the range is over {NOISY:.0%} of it)")
    return 0


def measure_in_llama_cpp(args: argparse.Namespace):
    """The GGUF files named by ``--model``, measured in llama.cpp (:mod:`adapruner.llama_runtime`)."""
    from pathlib import Path

    from ..from_gguf import gguf_architecture
    from ..llama_runtime import measure_gguf_interleaved
    from ..to_gguf import llama_cpp_module

    llama_cpp_module()
    for name in args.models:
        if not Path(name).is_file():
            raise AdaPrunerError(f"--runtime llama.cpp measures GGUF files; {name} is not a file "
                                 f"(write one with: adapruner export {name} --out FILE.gguf)")
        gguf_architecture(Path(name))  # refuses what is no GGUF file, from its header
    print(f"bench   {len(args.models)} GGUF files in llama.cpp, {args.repeats} interleaved rounds", file=sys.stderr,
          flush=True)
    return measure_gguf_interleaved({name: name for name in args.models}, repeats=args.repeats,
                                    new_tokens=args.new_tokens, threads=args.threads)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench-model`` command's flags."""
    p = sub.add_parser("bench-model", help="measured inference cost of models side by side: prefill and decode "
                       "tokens/s, peak memory")
    p.add_argument("--model", action="append", dest="models", required=True, metavar="MODEL",
                   help="built-in name, hub id, local folder, GGUF file or pruned folder (--runtime llama.cpp: GGUF "
                   "files); repeatable, measured in the order given, speed-ups relative to the first")
    p.add_argument("--runtime", choices=("torch", "llama.cpp"), default="torch",
                   help="torch: transformers' PyTorch models (any --model); llama.cpp: GGUF files, as llama.cpp, "
                   "Ollama and LM Studio run them (default: %(default)s)")
    p.add_argument("--threads", type=positive(int, "--threads"), default=None,
                   help="llama.cpp's threads (default: the cores this process may use)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--new-tokens", type=positive(int, "--new-tokens"), default=128,
                   help="greedy tokens generated per decode run (default: %(default)s)")
    p.add_argument("--repeats", type=positive(int, "--repeats"), default=3,
                   help="interleaved rounds, each model once per round; medians and ranges are reported "
                   "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=cmd_bench_model)
