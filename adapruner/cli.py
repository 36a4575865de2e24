"""``adapruner`` command line: ``eval``, ``prune``, ``finetune``, ``search``.

The service adds ``serve``, ``worker``, ``dashboard`` and ``db`` to the same parser (see
``service/cli.py``), so the library never imports the service. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import AdaPrunerError


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints the whole usage block by default)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name, hub id, local folder, GGUF file or pruned folder (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_eval_args(p: argparse.ArgumentParser, split_default: str = "test") -> None:
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="text source: builtin:books|wiki|news, hf:NAME[:CONFIG], or a local file/folder; "
                   "repeatable (default: builtin:books)")
    p.add_argument("--split", default=split_default, choices=["pool", "validation", "test"])
    p.add_argument("--seq-len", type=positive(int, "--seq-len"), default=128,
                   help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-windows", type=not_negative(int, "--max-windows"), default=64,
                   help="evaluate at most this many windows per source; 0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=positive(int, "--batch-size"), default=None,
                   help="windows per forward pass (default: 1024 tokens)")


def data_specs(args: argparse.Namespace) -> list[str]:
    return args.data or ["builtin:books"]


def batch_size(args: argparse.Namespace) -> int:
    return args.batch_size or max(1, 1024 // args.seq_len)


def positive(kind: type, name: str, allow_zero: bool = False) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value < 0 or (value == 0 and not allow_zero) or value != value:
            raise argparse.ArgumentTypeError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {text}")
        return value

    return parse


def not_negative(kind: type, name: str) -> Callable[[str], int | float]:
    return positive(kind, name, allow_zero=True)


def check_before_loading(args: argparse.Namespace) -> None:
    """Everything about the model, device and dtype that can be checked without loading the model."""
    from .device import resolve_device, resolve_dtype
    from .models import read_model_config

    if not hasattr(args, "model"):
        return
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    config = read_model_config(str(args.model))
    layers = getattr(args, "layers", None) if getattr(args, "allocation", None) == "layer_range" else None
    if config is not None and layers is not None and "num_hidden_layers" in config:
        from .plan import Allocation

        n_layers, (first, last) = config["num_hidden_layers"], layers
        try:
            Allocation(first, last).layer_range(n_layers)
        except AdaPrunerError:
            raise AdaPrunerError(f"--layers {first}:{last} does not fit the model's {n_layers} layers "
                                 f"(FIRST:LAST with 0 <= FIRST < LAST <= {n_layers}; a LAST <= 0 counts from the end)"
                                 ) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import eval_windows, load_source
    from .evaluate import perplexity
    from .models import load_model
    from .tasks import BUILTIN_TASKS, check_tasks, evaluate_tasks, headline, hub_task_names, mean_accuracy

    if args.list_tasks:
        print("built-in (offline): " + ", ".join(BUILTIN_TASKS))
        print(f"lm-evaluation-harness: {len(hub_task_names())} more (their data is fetched from the hub), e.g. "
              "piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq, openbookqa")
        return 0
    tasks = args.tasks or []
    check_tasks(tasks)  # before the slow model load, as the text below
    sources = [load_source(spec) for spec in (args.data or ([] if tasks else data_specs(args)))]
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    print(f"model   {args.model}  ({params / 1e6:.2f}M parameters, {next(model.parameters()).device}, "
          f"{next(model.parameters()).dtype})")
    for source in sources:
        windows = eval_windows(tokenizer, source, args.split, args.seq_len, args.max_windows or None)
        result = perplexity(model, windows, batch_size(args), desc=f"{source.name}/{args.split}")
        print(f"data    {source.name}/{args.split} (sha256 {source.hashes[args.split][:12]})  "
              f"{result.windows} windows x {args.seq_len} tokens = {result.tokens} predicted tokens")
        print(f"ppl     {result.ppl:.4f}  (nll {result.nll:.4f})  in {result.seconds:.1f}s")
    if not tasks:
        return 0
    results = evaluate_tasks(model, tokenizer, tasks, args.limit, args.num_fewshot, args.batch_size or 8)
    print(f"{'task':<20} {'metric':<12} {'value':>10} {'stderr':>8}  samples  data")
    for r in results:
        if r.error:
            print(f"{r.task:<20} failed: {r.error}")
        for metric, value in r.metrics.items():
            stderr = f"{r.stderr[metric]:.4f}" if metric in r.stderr else "-"
            digest = r.data_sha256[:12] if r.data_sha256 else "hub"
            print(f"{r.task:<20} {metric:<12} {value:>10.4f} {stderr:>8}  {r.samples:>7}  {digest}")
    mean = mean_accuracy(results)
    if mean is not None:
        print(f"mean accuracy {mean:.4f} over {sum(headline(r) is not None for r in results)} tasks "
              "(acc_mutual_info where a task has it, else acc)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(args.model), "tasks": [r.to_dict() for r in results],
                                               "mean_acc": mean}, indent=1))
    return 1 if any(r.error for r in results) else 0


def task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--tasks takes comma-separated task names, e.g. books-cloze,piqa")
    return names


def parse_mixture(text: str) -> dict[str, float]:
    """``taylor_first`` or ``wanda_sp=0.7,magnitude_l2=0.3``."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad metric weight in {part!r}") from None
    return weights


def parse_layers(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        first, last = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes FIRST:LAST, e.g. 4:-2, got {text!r}") from None
    if first < 0 or (last > 0 and first >= last):
        raise argparse.ArgumentTypeError(f"--layers takes FIRST:LAST with 0 <= FIRST < LAST (LAST may be negative, "
                                         f"counting from the end), got {text!r}")
    return first, last


def ratio_or_count(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio takes a fraction in (0, 1) or a parameter count, got {text!r}") \
            from None
    if value >= 1 and value.is_integer():
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--ratio must be in (0, 1) or a parameter count >= 1, got {text}")
    return value


def ratio_list(text: str) -> tuple[float | int, ...]:
    """``--ratio 0.1,0.2,0.3``: one target or several, each a fraction or a parameter count, no repeats."""
    ratios = tuple(ratio_or_count(part.strip()) for part in text.split(","))
    if len(set(ratios)) != len(ratios):
        raise argparse.ArgumentTypeError(f"--ratio lists a target twice: {text}")
    return ratios


def add_config_args(p: argparse.ArgumentParser) -> None:
    from .plan import LLM_PRUNER_LAYERS, SCOPES
    from .repair import REPAIR_MODES, Repair

    p.add_argument("--ratio", type=ratio_or_count, default=0.2,
                   help="share of ALL parameters to remove, or a parameter count (default: %(default)s)")
    p.add_argument("--aggregation", default="sum", help="sum | mean | max | prod | last (default: %(default)s)")
    p.add_argument("--allocation", default="layer_range",
                   help="uniform | layer_range | adaptive (default: %(default)s)")
    p.add_argument("--layers", type=parse_layers, default=LLM_PRUNER_LAYERS, metavar="FIRST:LAST",
                   help="layer_range: layers FIRST..LAST-1 are pruned (default: {}:{}, as LLM-Pruner)"
                   .format(*LLM_PRUNER_LAYERS))
    p.add_argument("--strength", type=float, default=0.5, help="adaptive allocation strength in [0, 1]")
    p.add_argument("--attn-share", type=float, default=None,
                   help="share of each layer's budget taken from attention groups (default: proportional)")
    p.add_argument("--scope", choices=SCOPES, default="layer",
                   help="layer: a budget per layer, as --allocation spreads it; global: one ranking of every group and "
                   "channel of the pruned layers, FLAP's (use a per-layer standardised metric: flap) "
                   "(default: %(default)s)")
    p.add_argument("--drop-layers", type=not_negative(int, "--drop-layers"), default=0,
                   help="remove this many whole decoder layers, those that change their input least "
                   "(ShortGPT's block influence); the rest of the target comes from width (default: %(default)s)")
    add_channel_multiple_arg(p)
    p.add_argument("--repair", choices=REPAIR_MODES, default=Repair.mode,
                   help="after the cut, put back what the removed o_proj/down_proj columns contributed: their mean as "
                   "a bias (bias, FLAP's), or predicted from the kept columns by ridge regression on the repair "
                   "windows' moments (pool) or layer by layer on the pruned model's own activations (sequential) "
                   "(default: %(default)s)")
    p.add_argument("--ridge", type=positive(float, "--ridge"), default=Repair.ridge,
                   help="the repair's ridge, relative to the kept inputs' mean variance; large: the bias alone "
                   "(default: kept columns per repair token)")
    p.add_argument("--repair-windows", type=positive(int, "--repair-windows"), default=256,
                   help="windows of each calibration source the repair's moments come from (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration and evaluation window (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="append", metavar="SOURCE",
                   help="evaluation text source, repeatable (default: the calibration sources)")
    p.add_argument("--max-windows", type=int, default=64,
                   help="evaluate at most this many windows per source and split; 0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: 1024 tokens)")


def add_export_dtype_arg(p: argparse.ArgumentParser) -> None:
    from .search import EXPORT_DTYPES

    p.add_argument("--export-dtype", choices=EXPORT_DTYPES, default="auto",
                   help="dtype of the saved weights (default: auto, the dtype the model was released in)")


def add_channel_multiple_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channel-multiple", type=positive(int, "--channel-multiple"), default=None,
                   help="keep each layer's MLP channels in multiples of this, for fast GPU kernels "
                   "(default: 64 on CUDA, 1 on CPU)")


def print_sizes(plan_sizes: list[dict[str, int]], dense: list[dict[str, int]]) -> None:
    print("layer  kv_heads  mlp_channels")
    for i, (size, base) in enumerate(zip(plan_sizes, dense, strict=True)):
        print(f"{i:5d}  {size['num_key_value_heads']:3d}/{base['num_key_value_heads']:<4d} "
              f"{size['intermediate_size']:6d}/{base['intermediate_size']}")


def add_lora_args(p: argparse.ArgumentParser, old_steps_flag: str, steps_default: int | None = None,
                  help_steps: str = "LoRA steps", old_prefix: str | None = None) -> None:
    """LoRA's flags, named alike in every command (``--lora-steps``, ``--lora-r``, ``--lora-lr``, ...);
    each command's older name for the step count (and, with ``old_prefix``, for r and lr) stays as an alias."""
    from .finetune import LoRA

    old = (lambda name: [f"{old_prefix}-{name}"]) if old_prefix else (lambda name: [])
    p.add_argument("--lora-steps", old_steps_flag, type=not_negative(int, "--lora-steps"),
                   default=LoRA.steps if steps_default is None else steps_default, dest="lora_steps",
                   help=f"{help_steps} (default: %(default)s; {old_steps_flag} is the same)")
    p.add_argument("--lora-r", *old("r"), type=positive(int, "--lora-r"), default=LoRA.r)
    p.add_argument("--lora-alpha", type=positive(int, "--lora-alpha"), default=LoRA.alpha)
    p.add_argument("--lora-dropout", type=float, default=LoRA.dropout)
    p.add_argument("--lora-lr", "--lr", *old("lr"), type=positive(float, "--lora-lr"), default=LoRA.lr, dest="lr")
    p.add_argument("--train-batch-size", type=positive(int, "--train-batch-size"), default=4)
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")


def lora_from(args: argparse.Namespace):
    from .finetune import LoRA

    return LoRA(steps=args.lora_steps, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, lr=args.lr,
                batch_size=args.train_batch_size, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)


def cmd_prune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .export import load_instructions, save_pruned
    from .importance import Mixture
    from .models import export_dtype
    from .plan import Allocation
    from .repair import Repair
    from .session import PruneConfig, PruningSession

    mixture = Mixture(args.metric, args.aggregation, args.seed)
    repair = Repair(args.repair, args.ridge)  # checked before the slow model load
    if args.incremental and repair.enabled:
        raise AdaPrunerError("--repair is not applied by --incremental; leave it off")
    allocation = replace(Allocation.named(args.allocation, *args.layers, strength=args.strength,
                                          attn_share=args.attn_share), drop_layers=args.drop_layers, scope=args.scope)
    if args.incremental and allocation.drop_layers:
        raise AdaPrunerError("--drop-layers is not applied by --incremental; leave it off")
    calib = args.calib or ["builtin:books:10"]
    session = PruningSession.open(args.model, calib, args.eval, pool_size=args.pool_size, seq_len=args.seq_len,
                                  seed=args.seed, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code, max_eval_windows=args.max_windows or None,
                                  batch_size=args.batch_size, channel_multiple=args.channel_multiple,
                                  repair_windows=args.repair_windows)
    config = PruneConfig(mixture, tuple(range(len(session.pool))), allocation, repair)
    before = session.structure.total_params
    if args.incremental:
        from .data import training_windows
        from .incremental import prune_incrementally

        if not isinstance(args.ratio, float):
            raise AdaPrunerError("--incremental takes --ratio as a fraction")
        train = training_windows(session.tokenizer, session.train_sources, args.seq_len) if args.lora_steps else None
        result = prune_incrementally(session.model, session.pool.windows, mixture, args.ratio, args.step,
                                     allocation, lora_from(args), train, progress=True)
        pruned = result.model
        for record in result.steps:
            loss = f", LoRA loss {record.finetune_loss:.3f}" if record.finetune_loss is not None else ""
            print(f"step    -> {record.target_ratio:.2%}: removed {record.removed:,}, {record.params:,} left "
                  f"({record.seconds:.0f}s{loss})")
        from .structure import model_structure

        sizes, ratio = model_structure(pruned).sizes(), 1 - model_structure(pruned).total_params / before
    else:
        pruned, plan = session.prune(config, args.ratio)
        sizes, ratio = plan.sizes(), plan.ratio
    after = sum(p.numel() for p in pruned.parameters())
    print(f"params  {before:,} -> {after:,}  (removed {before - after:,} = {ratio:.2%} of all)")
    print_sizes(sizes, session.structure.sizes())
    for split in ("validation", "test"):
        result = session.perplexity(pruned, split)
        print(f"{split:<10} ppl {result.ppl:.4f}  ({result.windows} windows, {result.seconds:.1f}s)")
    if args.out:
        save_pruned(pruned, session.tokenizer, args.out,
                    info={"base_model": args.model, "config": config.to_dict(), "ratio": ratio,
                          "incremental_step": args.step if args.incremental else None},
                    dtype=export_dtype(args.export_dtype, args.model, pruned))
        print(f"saved   {args.out}")
        uniform = all(size == sizes[0] for size in sizes)
        print(f"load    {load_instructions(args.out, uniform)}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from .data import eval_windows, load_source, training_windows
    from .evaluate import perplexity
    from .export import save_pruned
    from .finetune import finetune
    from .models import load_model

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
    save_pruned(result.model, tokenizer, out, info={"recovery": {
        "lora": {"steps": lora.steps, "r": lora.r, "alpha": lora.alpha, "lr": lora.lr, "batch_size": lora.batch_size},
        f"{args.split}_ppl_before": before.ppl, f"{args.split}_ppl_after": after.ppl, "seconds": result.seconds}})
    print(f"saved   {out}")
    return 0


def parse_fixed(text: str) -> tuple[str, object]:
    """``name=value`` for --fix: numbers become numbers, ``none`` becomes None."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--fix takes NAME=VALUE, got {text!r}")
    if value.lower() == "none":
        return name, None
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


# The search command's flags whose names differ from the job's fields (``space.*`` and ``recover.*`` for the
# search space's and the recovery's); every other field ``f`` is the flag ``--f`` with ``-`` for ``_``. The HTTP
# API takes the fields by their own names; tests/test_cli.py checks that both take every field, with one default.
SEARCH_FLAGS = {
    "calibration": "--calib", "evaluation": "--eval", "space.n_clusters": "--clusters", "space.fixed": "--fix",
    "recover.steps": "--lora-steps", "recover.lr": "--lora-lr", "recover.r": "--lora-r",
    "recover.alpha": "--lora-alpha", "recover.batch_size": "--train-batch-size", "measure_cost": "--no-measure",
}


def search_job(args: argparse.Namespace):
    """The :class:`~adapruner.search.SearchJob` of a parsed ``search`` command (its first target's)."""
    from .search import SearchJob, SearchSpace

    space = SearchSpace(
        metrics=tuple(args.metrics.split(",")) if args.metrics else SearchSpace.metrics,
        calibration=args.calibration, subset_size=args.subset_size, n_clusters=args.clusters,
        repairs=tuple(args.repairs.split(",")), scopes=tuple(args.scopes.split(",")),
        scores=tuple(args.scores.split(",")), depth=args.depth, aggregations=tuple(args.aggregations.split(",")),
        ridge=args.ridge, attn_share=args.attn_share, fixed=dict(args.fix or []),
    )
    return SearchJob(
        model=args.model, calibration=tuple(args.calib or SearchJob.calibration), evaluation=tuple(args.eval or ()),
        heldout=parse_heldout(args.heldout),
        ratio=args.ratio[0], trials=args.trials, sampler=args.sampler, pruner=args.pruner, seed=args.seed,
        pool_size=args.pool_size, seq_len=args.seq_len, val_windows=args.val_windows, test_windows=args.test_windows,
        baselines=tuple(b for b in args.baselines.split(",") if b), baseline_draws=args.baseline_draws, space=space,
        start=args.start, repair_windows=args.repair_windows, finalists=args.finalists,
        selection_windows=args.selection_windows,
        channel_multiple=args.channel_multiple,
        recover=lora_from(args) if args.lora_steps else None,
        tasks=tuple(args.tasks or ()), task_limit=args.task_limit, export_dtype=args.export_dtype,
        measure_cost=args.measure_cost,
    )


def cmd_search(args: argparse.Namespace) -> int:
    from .search import run_targets, write_tradeoff_report
    from .tasks import check_tasks

    job = search_job(args)
    check_tasks(job.tasks)  # before the model loads
    name = args.study or job.default_study_name
    out = Path(args.out or Path("runs") / name)
    results = run_targets(job, args.ratio, args.storage, name, device=args.device, dtype=args.dtype, out_dir=out,
                          artifact_dir=args.artifacts)
    several = len(args.ratio) > 1
    for ratio, result in zip(args.ratio, results, strict=False):
        if several:
            print(f"target  {ratio:g} ({result.study.study_name})")
        print_result(result, out / f"r{ratio:g}" if several else out, args.storage)
    if several:
        print(f"trade-off {write_tradeoff_report([r.study for r in results], out)}")
    return 0


def print_result(result, out: Path, storage: str) -> None:
    """What one target's search found: the best, its margin over LLM-Pruner, tasks, recovery, where things are."""
    from .search import StudyKey, TrialKey, baseline_trials, describe_config, load_line, margin_sentence, write_report

    report = write_report(result.study, out)
    best = result.best_trial
    if best is not None:
        heldout = best.user_attrs.get(TrialKey.HELDOUT_PPL)
        print(f"best    trial {best.number}: validation ppl {best.value:.3f}, "
              f"test ppl {best.user_attrs.get(TrialKey.TEST_PPL, float('nan')):.3f}"
              + (f", held-out test ppl {heldout:.3f}" if heldout else ""))
        print(f"config  {describe_config(best.user_attrs[TrialKey.CONFIG])}")
        reference = baseline_trials(result.study).get("llm-pruner")
        if reference is not None and margin_sentence(best, reference):
            print(f"margin  {margin_sentence(best, reference)}")
        tasks = result.study.user_attrs.get(StudyKey.TASKS)
        if tasks and tasks["best_retained"] is not None:
            print(f"tasks   mean accuracy {tasks['models']['best']['mean_acc']:.3f} on {', '.join(tasks['tasks'])}: "
                  f"{tasks['best_retained']:.1%} of the unpruned model's")
        cost = result.study.user_attrs.get(StudyKey.INFERENCE_COST)
        if cost and "best" in cost["speedups"]:
            speed = cost["speedups"]["best"]
            print(f"speed   decode {cost['models']['best']['decode_tokens_per_s']:.1f} tokens/s, "
                  f"{speed['decode']:.2f}x the unpruned model's; peak memory {speed['peak_memory']:.2f}x")
    recovery = result.study.user_attrs.get(StudyKey.RECOVERY)
    if recovery:
        print(f"LoRA    {recovery['steps']} steps: test ppl {recovery['test_ppl_before']:.3f} -> "
              f"{recovery['test_ppl_after']:.3f} ({recovery['seconds']:.0f}s)")
    print(f"report  {report}")
    if result.model_dir:
        print(f"model   {result.model_dir}  (artifact {result.artifact_id})")
        print(f"load    {load_line(best, str(result.model_dir))}")
    print(f"study   {result.study.study_name} in {storage}  (optuna-dashboard {storage})")


def parse_heldout(values: list[str] | None) -> tuple[str, ...] | None:
    """``--heldout``: None (not given) means the default; ``none`` means no held-out test."""
    if not values:
        return None
    return () if [v.lower() for v in values] == ["none"] else tuple(values)


def subset_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--subset-size takes MIN:MAX, got {text!r}") from None


def ridge_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    try:
        low, high = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ridge takes MIN:MAX, got {text!r}") from None
    if not 0 < low <= high < float("inf"):
        raise argparse.ArgumentTypeError(f"--ridge takes MIN:MAX with 0 < MIN <= MAX, got {text!r}")
    return low, high


def cmd_bench_model(args: argparse.Namespace) -> int:
    from .device import resolve_device, resolve_dtype
    from .inference_cost import measure_folder, speedups
    from .models import read_model_config

    # every refusal before the first load: a bad last model should not cost the first one's measurement
    if args.new_tokens < 2:
        raise AdaPrunerError(f"--new-tokens must be at least 2 (the first comes from the prompt's forward pass), "
                             f"got {args.new_tokens}")
    repeated = sorted({name for name in args.models if args.models.count(name) > 1})
    if repeated:
        raise AdaPrunerError(f"--model {repeated[0]} is given more than once")
    resolve_dtype(args.dtype, resolve_device(args.device))
    for name in args.models:
        read_model_config(name)
    costs = {}
    for i, name in enumerate(args.models, 1):
        print(f"bench   {i}/{len(args.models)} {name}", file=sys.stderr, flush=True)
        costs[name] = measure_folder(name, device=args.device, dtype=args.dtype, new_tokens=args.new_tokens,
                                     repeats=args.repeats)
    reference = args.models[0]
    ratios = speedups(costs, reference)
    if args.json:
        print(json.dumps({"reference": reference, "models": {name: cost.to_dict() for name, cost in costs.items()},
                          "speedups": ratios}, indent=1))
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
              f"{ratios[name]['decode']:.2f}")
    first = costs[reference]
    print(f"({first.device}, {first.dtype}, {first.threads} threads; prefill and decode in tokens/s, "
          f"decode x relative to {reference})")
    return 0


def build_parser(add_commands: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The parser of the library's commands; ``add_commands(subparsers)`` may add more (the service's)."""
    parser = OneLineParser(prog="adapruner", description="Sample-aware structured pruning of LLaMA-family LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("eval", help="perplexity of a model on a text source, and accuracy on lm-eval tasks")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--tasks", type=task_list, default=None, metavar="TASK[,TASK...]",
                   help="lm-evaluation-harness tasks (books-cloze and books-lastword are built in and offline); "
                   "with --tasks, perplexity only for the --data given")
    p.add_argument("--limit", type=positive(int, "--limit"), default=None, help="at most this many items per task")
    p.add_argument("--num-fewshot", type=not_negative(int, "--num-fewshot"), default=None,
                   help="few-shot examples per item (default: the task's own)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the task results to FILE as JSON")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    p.set_defaults(func=cmd_eval)

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
    p.add_argument("--incremental", action="store_true",
                   help="Adapt-Pruner's schedule: prune --step at a time, re-estimating importance each step")
    p.add_argument("--step", type=positive(float, "--step"), default=0.05, help="incremental step (default: 0.05)")
    add_lora_args(p, "--finetune-steps", 0)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="recover a pruned model with LoRA, merged back into its weights")
    add_model_args(p)
    add_eval_args(p)
    add_lora_args(p, "--steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: MODEL-lora)")
    p.set_defaults(func=cmd_finetune)

    from .importance import AGGREGATIONS
    from .plan import SCOPES
    from .repair import REPAIR_MODES
    from .search import (
        BASELINES,
        CALIBRATION_MODES,
        DEFAULT_BASELINES,
        PRUNERS,
        SAMPLERS,
        STARTS,
        SearchJob,
        SearchSpace,
    )

    p = sub.add_parser("search", help="Bayesian-optimization search for the best pruning configuration")
    add_model_args(p)
    p.add_argument("--ratio", type=ratio_list, default=(SearchJob.ratio,), metavar="RATIO[,RATIO...]",
                   help="share of ALL parameters to remove, in (0, 1), or a parameter count; several, comma-separated, "
                   f"run one study per target and report the trade-off (default: {SearchJob.ratio})")
    p.add_argument("--trials", type=positive(int, "--trials"), default=SearchJob.trials,
                   help="searched trials to finish; the baselines run besides them (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default=SearchJob.sampler)
    p.add_argument("--pruner", choices=PRUNERS, default=SearchJob.pruner, help="early stopping (default: %(default)s)")
    p.add_argument("--storage", default="sqlite:///runs/adapruner.db",
                   help="Optuna storage URL (default: %(default)s); postgresql://... for many machines")
    p.add_argument("--study", default=None, help="study name; the same name resumes (default: from the job)")
    p.add_argument("--calib", action="append", metavar="SOURCE",
                   help=f"calibration pool source, repeatable (default: {' '.join(SearchJob.calibration)})")
    p.add_argument("--eval", action="append", metavar="SOURCE",
                   help="validation and in-domain test source, repeatable (default: the calibration sources)")
    p.add_argument("--heldout", action="append", metavar="SOURCE",
                   help="out-of-domain test source, repeatable, never calibrated or validated on; 'none' for none "
                   "(default: the built-in sources the job does not use, when it uses one)")
    p.add_argument("--pool-size", type=positive(int, "--pool-size"), default=SearchJob.pool_size,
                   help="candidate calibration windows (default: %(default)s)")
    p.add_argument("--seq-len", type=positive(int, "--seq-len"), default=SearchJob.seq_len)
    p.add_argument("--val-windows", type=positive(int, "--val-windows"), default=SearchJob.val_windows,
                   help="validation windows per source (default: %(default)s)")
    p.add_argument("--test-windows", type=positive(int, "--test-windows"), default=SearchJob.test_windows)
    p.add_argument("--seed", type=int, default=SearchJob.seed)
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help=f"comma-separated, from {', '.join(BASELINES)}; empty for none (default: %(default)s)")
    p.add_argument("--baseline-draws", type=positive(int, "--baseline-draws"), default=SearchJob.baseline_draws,
                   help="calibration draws of each baseline that samples its calibration at random; margins are "
                   "against their mean (default: %(default)s)")
    p.add_argument("--start", choices=STARTS, default=SearchJob.start,
                   help="first searched trials: random (TPE's start-up), informed (LLM-Pruner's and FLAP's "
                   "configurations, the shipped priors) or warm (also earlier studies in the storage that never saw "
                   "the held-out sources) (default: %(default)s)")
    p.add_argument("--repair-windows", type=positive(int, "--repair-windows"), default=SearchJob.repair_windows,
                   help="windows of each calibration source the repair's input moments come from "
                   "(default: %(default)s)")
    p.add_argument("--finalists", type=positive(int, "--finalists"), default=SearchJob.finalists,
                   help="best trials by validation re-scored on more validation windows before the final choice "
                   "(default: %(default)s)")
    p.add_argument("--selection-windows", type=not_negative(int, "--selection-windows"),
                   default=SearchJob.selection_windows,
                   help="validation windows per source added for that re-scoring (default: %(default)s)")
    p.add_argument("--metrics", default=None, help="metrics the mixture may use, comma-separated")
    p.add_argument("--calibration", choices=CALIBRATION_MODES, default=SearchSpace.calibration,
                   help="how subsets are searched (default: %(default)s)")
    p.add_argument("--subset-size", type=subset_range, default=SearchSpace.subset_size, metavar="MIN:MAX")
    p.add_argument("--clusters", type=positive(int, "--clusters"), default=SearchSpace.n_clusters)
    p.add_argument("--repairs", default=",".join(SearchSpace.repairs),
                   help=f"repair modes the search may choose, comma-separated, from {', '.join(REPAIR_MODES)} "
                   "(default: %(default)s)")
    p.add_argument("--scores", default=",".join(SearchSpace.scores),
                   help="importance the search may choose, comma-separated: mixture (of --metrics), flap (FLAP's "
                   "standardised score) (default: %(default)s)")
    p.add_argument("--aggregations", default=",".join(SearchSpace.aggregations),
                   help=f"how the mixture may aggregate a group's unit scores, comma-separated, from "
                   f"{', '.join(AGGREGATIONS)} (default: %(default)s)")
    p.add_argument("--ridge", type=ridge_range, default=SearchSpace.ridge, metavar="MIN:MAX",
                   help="range of the repair's ridge, searched on a log scale (default: %(default)s)")
    p.add_argument("--attn-share", action=argparse.BooleanOptionalAction, default=SearchSpace.attn_share,
                   help="search the attention's share of the cut (else proportional to its size)")
    p.add_argument("--scopes", default=",".join(SearchSpace.scopes),
                   help=f"allocation scopes the search may choose, comma-separated, from {', '.join(SCOPES)}: a budget "
                   "per layer, or one ranking of every unit (FLAP's) (default: %(default)s)")
    p.add_argument("--no-measure", action="store_false", dest="measure_cost",
                   help="skip measuring the speed and memory of the unpruned model, the baselines and the best")
    p.add_argument("--depth", action=argparse.BooleanOptionalAction, default=SearchSpace.depth,
                   help="also search how many whole decoder layers to drop (0 .. a quarter of them, as far as the "
                   "target pays); --no-depth for width only; --fix drop_layers=N drops N in every trial "
                   "(default: on)")
    add_channel_multiple_arg(p)
    p.add_argument("--fix", type=parse_fixed, action="append", metavar="NAME=VALUE",
                   help="fix a search parameter, e.g. aggregation=sum or strength=0; repeatable")
    p.add_argument("--out", default=None, help="report and model folder (default: runs/STUDY)")
    add_export_dtype_arg(p)
    p.add_argument("--artifacts", default=None,
                   help="Optuna artifact store: a folder or s3://BUCKET (default: beside the database)")
    add_lora_args(p, "--recover-steps", 0, "LoRA steps to fine-tune the best configuration after the search",
                  old_prefix="--recover")
    p.add_argument("--tasks", type=task_list, default=None, metavar="TASK[,TASK...]",
                   help="lm-eval tasks to score the unpruned model, the baselines and the best on after the search "
                   "(e.g. books-cloze,books-lastword; `adapruner eval --list-tasks`)")
    p.add_argument("--task-limit", type=positive(int, "--task-limit"), default=SearchJob.task_limit,
                   help="at most this many items per task (default: all)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("bench-model", help="measured inference cost of models side by side: prefill and decode "
                       "tokens/s, peak memory")
    p.add_argument("--model", action="append", dest="models", required=True, metavar="MODEL",
                   help="built-in name, hub id, local folder, GGUF file or pruned folder; repeatable, measured in "
                   "the order given, speed-ups relative to the first")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--new-tokens", type=positive(int, "--new-tokens"), default=128,
                   help="greedy tokens generated per decode run (default: %(default)s)")
    p.add_argument("--repeats", type=positive(int, "--repeats"), default=3,
                   help="timed runs per measurement; the median is reported (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=cmd_bench_model)
    if add_commands is not None:
        add_commands(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        import optuna
        import transformers

        transformers.utils.logging.disable_progress_bar()  # our own bars say what is happening
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        check_before_loading(args)
        return int(args.func(args) or 0)
    except AdaPrunerError as exc:
        print(f"adapruner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapruner: interrupted", file=sys.stderr)
        return 130

