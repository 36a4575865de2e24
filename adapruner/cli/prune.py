"""``adapruner prune``: prune a model once with a fixed configuration (or incrementally), repair, save."""

from __future__ import annotations

import argparse

from ..errors import AdaPrunerError
from .args import (
    add_config_args,
    add_export_dtype_arg,
    add_export_format_args,
    add_lora_args,
    add_model_args,
    lora_from,
    parse_mixture,
    positive,
)


def print_sizes(plan_sizes: list[dict[str, int]], unpruned: list[dict[str, int]],
                dropped: tuple[int, ...] = ()) -> None:
    """Each layer of the unpruned model: what it kept, or that it was dropped (``plan_sizes``: the kept layers')."""
    print("layer  kv_heads  mlp_channels")
    kept = iter(plan_sizes)
    for i, base in enumerate(unpruned):
        if i in dropped:
            print(f"{i:5d}  dropped")
            continue
        size = next(kept)
        print(f"{i:5d}  {size['num_key_value_heads']:3d}/{base['num_key_value_heads']:<4d} "
              f"{size['intermediate_size']:6d}/{base['intermediate_size']}")


def cmd_prune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..export import load_instructions, save_pruned
    from ..importance import Mixture
    from ..models import export_dtype
    from ..plan import Allocation
    from ..repair import Repair
    from ..session import PruneConfig, PruningSession

    mixture = Mixture(args.metric, args.aggregation, args.seed)
    repair = Repair(args.repair, args.ridge)  # checked before the slow model load
    if args.incremental and repair.enabled:
        raise AdaPrunerError("--repair is not applied by --incremental; leave it off")
    allocation = replace(Allocation.named(args.allocation, *args.layers, strength=args.strength,
                                          attn_share=args.attn_share), drop_layers=args.drop_layers, scope=args.scope)
    if args.incremental and allocation.drop_layers:
        raise AdaPrunerError("--drop-layers is not applied by --incremental; leave it off")
    if args.incremental and args.iterations > 1:
        raise AdaPrunerError("--iterations is --incremental's own schedule without LoRA; give one of them")
    PruneConfig(mixture, (), allocation, repair, args.iterations)  # its checks, before the slow model load
    if args.export_format == "gguf":
        from ..models import check_gguf_exportable
        from ..to_gguf import check_quant

        if not args.out:
            raise AdaPrunerError("--export-format gguf writes beside the folder: give --out")
        check_quant(args.gguf_type)
        check_gguf_exportable(args.model)
    calib = args.calib or ["builtin:books:10"]
    session = PruningSession.open(args.model, calib, args.eval, pool_size=args.pool_size, seq_len=args.seq_len,
                                  seed=args.seed, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code, max_eval_windows=args.max_windows or None,
                                  batch_size=args.batch_size, channel_multiple=args.channel_multiple,
                                  repair_windows=args.repair_windows)
    config = PruneConfig(mixture, tuple(range(len(session.pool))), allocation, repair, args.iterations)
    before = session.structure.total_params
    if args.incremental:
        from ..data import training_windows
        from ..incremental import prune_incrementally

        if not isinstance(args.target, float):
            raise AdaPrunerError("--incremental takes --target as a fraction")
        train = training_windows(session.tokenizer, session.train_sources, args.seq_len) if args.lora_steps else None
        result = prune_incrementally(session.model, session.pool.windows, mixture, args.target, args.step,
                                     allocation, lora_from(args), train, progress=True)
        pruned = result.model
        for record in result.steps:
            loss = f", LoRA loss {record.finetune_loss:.3f}" if record.finetune_loss is not None else ""
            print(f"step    -> {record.target:.2%}: removed {record.removed:,}, {record.params:,} left "
                  f"({record.seconds:.0f}s{loss})")
        from ..structure import model_structure

        sizes, removed_share = model_structure(pruned).sizes(), 1 - model_structure(pruned).total_params / before
        dropped = ()
    else:
        pruned, plan = session.prune(config, args.target, share_unchanged=True)  # no second copy of the uncut weights
        sizes, removed_share, dropped = plan.sizes(), plan.removed_share, plan.dropped
    after = sum(p.numel() for p in pruned.parameters())
    print(f"params  {before:,} -> {after:,}  (removed {before - after:,} = {removed_share:.2%} of all)")
    print_sizes(sizes, session.structure.sizes(), dropped)
    for split in ("validation", "test"):
        result = session.perplexity(pruned, split)
        print(f"{split:<10} ppl {result.ppl:.4f}  ({result.windows} windows, {result.seconds:.1f}s)")
    if args.out:
        save_pruned(pruned, session.tokenizer, args.out,
                    info={"base_model": args.model, "config": config.to_dict(), "removed_share": removed_share,
                          "incremental_step": args.step if args.incremental else None},
                    dtype=export_dtype(args.export_dtype, args.model, pruned))
        print(f"saved   {args.out}")
        uniform = all(size == sizes[0] for size in sizes)
        print(f"load    {load_instructions(args.out, uniform)}")
        if args.export_format == "gguf":
            from pathlib import Path

            from ..to_gguf import write_gguf

            gguf = write_gguf(args.out, Path(args.out) / "model.gguf", args.gguf_type)
            print(f"gguf    {gguf} ({args.gguf_type}); run: llama-cli -m {gguf}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``prune`` command's flags."""
    p = sub.add_parser("prune", help="prune a model once with a fixed configuration")
    add_model_args(p)
    add_config_args(p)
    p.add_argument("--metric", type=parse_mixture, default={"taylor_first": 1.0},
                   help="importance metric or weighted mixture, e.g. wanda_sp=0.7,magnitude_l2=0.3 "
                   "(default: taylor_first)")
    p.add_argument("--calib", action="append", metavar="SOURCE[:N]",
                   help="calibration samples: source and count, repeatable (default: builtin:books:10)")
    p.add_argument("--pool-size", type=int, default=10, help="samples for --calib sources given without a count")
    p.add_argument("--out", default=None, help="folder to save the pruned model to")
    add_export_dtype_arg(p)
    add_export_format_args(p)
    p.add_argument("--incremental", action="store_true",
                   help="Adapt-Pruner's schedule: prune --step at a time, re-estimating importance each step")
    p.add_argument("--step", type=positive(float, "--step"), default=0.05, help="incremental step (default: 0.05)")
    p.add_argument("--iterations", type=positive(int, "--iterations"), default=1,
                   help="build the plan in this many steps, FLAP's score re-measured on the pruned (and repaired) "
                   "model between them; needs --metric flap (default: 1)")
    add_lora_args(p, "--finetune-steps", 0)
    p.set_defaults(func=cmd_prune)
