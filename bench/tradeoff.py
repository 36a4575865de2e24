"""What the pruned model buys: perplexity against measured speed, width only and width + depth.

For each ratio, two studies on SmolLM2-135M with the default data (calibrated and validated on
``builtin:books`` and ``builtin:wiki``, tested in-domain on their test parts and out-of-domain on
``builtin:news``), both starting from LLM-Pruner's default as a baseline:

- **width**: the default search space (attention groups and MLP channels only);
- **width + depth**: the same space with ``drop_layers`` fixed to the layers that half the target pays
  for (a rule set before any run, capped at a quarter of the layers: 3 at 20%, 7 at 40%), the width
  search covering the rest.

Then, in one process, one model after another on the same inputs and threads: the unpruned model,
LLM-Pruner's default, the best of each study (best by validation) are rebuilt and measured
(:func:`adapruner.inference_cost.measure_cost`: greedy decode at batch 1 with the KV cache, prefill
1x512 and 8x128, peak memory). Nothing is tuned on the test numbers.

    python bench/tradeoff.py                      # 20% and 40%, 2 threads
    python bench/tradeoff.py --ratios 0.4 --trials 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from adapruner.inference_cost import measure_cost
from adapruner.search import SearchJob, SearchSpace, baseline_trials, open_session, run_search
from adapruner.search.objective import max_drop_layers
from adapruner.search.record import StudyKey, TrialKey
from adapruner.session import PruneConfig


def quality(attrs: dict) -> dict:
    return {"val_ppl": attrs.get("val_ppl"), "test_ppl": attrs.get("test_ppl"), "heldout_ppl": attrs.get("heldout_ppl"),
            "params_kept": attrs.get("params_kept"), "dropped_layers": attrs.get("dropped_layers", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--trials", type=int, default=12, help="per study, the baseline included")
    parser.add_argument("--pool-size", type=int, default=32)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--test-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--storage", default="sqlite:///runs/bench-tradeoff.db")
    parser.add_argument("--json", default="runs/tradeoff.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path("runs").mkdir(exist_ok=True)
    base = SearchJob(trials=args.trials, pool_size=args.pool_size, val_windows=args.val_windows,
                     test_windows=args.test_windows, baselines=("llm-pruner",), measure_cost=False)
    session = open_session(base, progress=False)
    n_layers = len(session.structure.layers)
    rows: dict[str, dict] = {"unpruned": {"ratio": 0.0, "model": lambda: session.model, "params_kept":
                                          session.structure.total_params}}
    studies = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        drop = min(max_drop_layers(session.structure, ratio / 2), n_layers // 4)
        for kind, space in (("width", SearchSpace()), (f"width+depth ({drop} layers)",
                                                        SearchSpace(fixed={"drop_layers": drop}))):
            job = replace(base, target=ratio, space=space)
            name = f"tradeoff-{'depth' if 'depth' in kind else 'width'}-r{ratio:g}-t{args.trials}"
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="adapruner-bench-") as artifacts:
                study = run_search(job, args.storage, name, session=session, artifact_dir=artifacts,
                                   progress=False).study
            print(f"{name}: best val ppl {study.best_value:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
            studies[(ratio, kind)] = study
            best = study.best_trial
            config = PruneConfig.from_dict(best.user_attrs[TrialKey.CONFIG])
            rows[f"{ratio:.0%} best {kind}"] = {"ratio": ratio, **quality(best.user_attrs),
                                              "model": lambda c=config, r=ratio: session.prune(c, r)[0]}
            if kind == "width":
                reference = baseline_trials(study)["llm-pruner"]
                config = PruneConfig.from_dict(reference.user_attrs[TrialKey.CONFIG])
                rows[f"{ratio:.0%} LLM-Pruner default"] = {"ratio": ratio, **quality(reference.user_attrs),
                                                          "model": lambda c=config, r=ratio: session.prune(c, r)[0]}
    unpruned = next(iter(studies.values())).user_attrs[StudyKey.UNPRUNED]
    rows["unpruned"] |= {"val_ppl": unpruned["validation"], "test_ppl": unpruned["test"],
                         "heldout_ppl": unpruned.get("heldout")}
    print(f"measuring {len(rows)} models one after another ({args.threads} threads, {args.repeats} repeats)",
          flush=True)
    results = {}
    for label, row in rows.items():
        model = row.pop("model")()
        results[label] = {**row, "cost": measure_cost(model, repeats=args.repeats).to_dict()}
        del model
        print(f"  {label}: decode {results[label]['cost']['decode_tokens_per_s']:.1f} tokens/s", flush=True)
    reference = results["unpruned"]["cost"]
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n| model | parameters | test ppl (books, wiki) | held-out ppl (news) | decode tokens/s | × unpruned "
          "| prefill 1x512 × | prefill 8x128 × | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in results.items():
        cost = row["cost"]
        prefill = [cost["prefill_tokens_per_s"][s] / reference["prefill_tokens_per_s"][s] for s in ("1x512", "8x128")]
        decode = cost["decode_tokens_per_s"]
        print(f"| {label} | {cost['parameters'] / 1e6:.1f}M | {row['test_ppl']:.2f} | {row['heldout_ppl']:.2f} | "
              f"{decode:.1f} | {decode / reference['decode_tokens_per_s']:.2f} "
              f"| {prefill[0]:.2f} | {prefill[1]:.2f} | {cost['peak_memory_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
