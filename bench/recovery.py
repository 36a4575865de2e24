"""Recovery benchmark: one-shot vs Adapt-Pruner's incremental pruning, without and with LoRA.

SmolLM2-135M pruned by 20% and 40% of all parameters with LLM-Pruner's importance (first-order
Taylor on 10 random book windows). One-shot prunes once with LLM-Pruner's layer range; incremental
prunes ``--step`` at a time with the same importance re-estimated on the current model and
Adapt-Pruner's adaptive layer shares. Both then get the same LoRA budget (``--lora-steps`` steps of
``--batch-size`` book windows from the pool part; incremental spends it in equal parts after each
step). Test perplexity on the books test split; each fine-tuned model is saved, reloaded and checked
for identical logits.

    python bench/recovery.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from adapruner.data import training_windows
from adapruner.export import load_pruned, save_pruned
from adapruner.finetune import LoRA, finetune
from adapruner.importance import Mixture
from adapruner.incremental import prune_incrementally, schedule
from adapruner.plan import Allocation
from adapruner.search import SearchJob, open_session
from adapruner.session import PruneConfig
from adapruner.structure import model_structure


def reloads_identically(model, tokenizer, ids) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, tokenizer, tmp)
        loaded, _ = load_pruned(tmp)
        with torch.no_grad():
            return torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--lora-steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--test-windows", type=int, default=64)
    args = parser.parse_args()
    session = open_session(SearchJob(pool_size=10, test_windows=args.test_windows), progress=False)
    train = training_windows(session.tokenizer, session.train_sources, 128)
    calibration = session.pool.windows
    mixture = Mixture.single("taylor_first")
    test = session.windows("test")
    ids = test[:2]
    original = session.structure.total_params
    rows = [("unpruned", "—", 0, session.perplexity(session.model, "test").ppl, 0.0, 0.0, 0.0, "—")]
    for ratio in (float(r) for r in args.ratios.split(",")):
        n_steps = len(schedule(ratio, args.step))
        for lora_steps in (0, args.lora_steps):
            lora = LoRA(steps=lora_steps, lr=args.lr, batch_size=args.batch_size)
            # one-shot
            start = time.perf_counter()
            config = PruneConfig(mixture, tuple(range(len(session.pool))), Allocation.named("layer_range"))
            pruned, _ = session.prune(config, ratio)
            prune_s = time.perf_counter() - start
            tuned = finetune(pruned, train, lora, progress=False)
            removed = 1 - model_structure(tuned.model).total_params / original
            rows.append((f"{ratio:.0%}", "one-shot", lora_steps, session.perplexity(tuned.model, "test").ppl,
                         removed, prune_s, tuned.seconds,
                         reloads_identically(tuned.model, session.tokenizer, ids) if lora_steps else "—"))
            print(rows[-1], file=sys.stderr, flush=True)
            # incremental: the same budget, spread over the steps
            share = LoRA(steps=lora_steps // n_steps, lr=args.lr, batch_size=args.batch_size)
            result = prune_incrementally(session.model, calibration, mixture, ratio, args.step,
                                         Allocation(strength=0.5), share, train, progress=False)
            last = finetune(result.model, train, share, progress=False)
            steps_s = sum(s.seconds for s in result.steps)  # re-estimation, slicing and LoRA between steps
            removed = 1 - model_structure(last.model).total_params / original
            rows.append((f"{ratio:.0%}", f"incremental ({n_steps} x {args.step:.0%})", share.steps * n_steps,
                         session.perplexity(last.model, "test").ppl, removed, steps_s, last.seconds,
                         reloads_identically(last.model, session.tokenizer, ids) if lora_steps else "—"))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"SmolLM2-135M; importance: first-order Taylor on 10 random book windows; LoRA r=8, alpha=16, "
          f"lr {args.lr:g}, batch {args.batch_size} x 128 tokens of the books pool part; test ppl on "
          f"{test.shape[0]} book test windows; CPU, {torch.get_num_threads()} threads.\n")
    print("| target | schedule | LoRA steps | test ppl | removed | pruning s (incremental: with LoRA between "
          "steps) | final LoRA s | reload identical |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for target, sched, steps, ppl, removed, prune_s, lora_s, same in rows:
        removed_txt = "—" if sched == "—" else f"{removed:.2%}"
        print(f"| {target} | {sched} | {steps} | {ppl:,.2f} | {removed_txt} | {prune_s:.0f} | {lora_s:.0f} | {same} |")


if __name__ == "__main__":
    main()
