"""``adapruner finetune``: fine-tune a pruned model with LoRA, merged back into its weights."""

from __future__ import annotations

import argparse

from .args import add_eval_args, add_lora_args, add_model_args, batch_size, data_specs, lora_from


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from ..data import eval_windows, load_source, training_windows
    from ..evaluate import perplexity
    from ..export import save_pruned
    from ..finetune import finetune
    from ..models import load_model

    lora = lora_from(args)
    sources = [load_source(spec) for spec in data_specs(args)]
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    train = training_windows(tokenizer, sources, args.seq_len)
    test = torch.cat([eval_windows(tokenizer, s, args.split, args.seq_len, args.max_windows or None) for s in sources])
    before = perplexity(model, test, batch_size(args), desc=f"{args.split} before")
    print(f"before  {args.split} ppl {before.ppl:.4f} ({before.windows} windows)")
    result = finetune(model, train, lora)
    after = perplexity(result.model, test, batch_size(args), desc=f"{args.split} after")
    print(f"LoRA    {lora.steps} steps x {lora.batch_size} windows in {result.seconds:.0f}s, "
          f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}")
    print(f"after   {args.split} ppl {after.ppl:.4f}")
    out = args.out or str(args.model).rstrip("/") + "-lora"
    save_pruned(result.model, tokenizer, out, info={"finetune": {
        "lora": {"steps": lora.steps, "r": lora.r, "alpha": lora.alpha, "lr": lora.lr, "batch_size": lora.batch_size},
        f"{args.split}_ppl_before": before.ppl, f"{args.split}_ppl_after": after.ppl, "seconds": result.seconds}})
    print(f"saved   {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``finetune`` command's flags."""
    p = sub.add_parser("finetune", help="fine-tune a pruned model with LoRA, merged back into its weights")
    add_model_args(p)
    add_eval_args(p)
    add_lora_args(p, "--steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: MODEL-lora)")
    p.set_defaults(func=cmd_finetune)
