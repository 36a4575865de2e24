"""``adapruner search``: the Bayesian-optimization search, and what it prints when done."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import (
    add_channel_multiple_arg,
    add_export_dtype_arg,
    add_export_format_args,
    add_lora_args,
    add_model_args,
    iterations_range,
    lora_from,
    not_negative,
    parse_fixed,
    parse_heldout,
    positive,
    ridge_range,
    subset_range,
    target_list,
    task_list,
)

# The search command's flags whose names differ from the job's fields (``space.*`` and ``finetune.*`` for the
# search space's and the LoRA fine-tuning's); every other field ``f`` is the flag ``--f`` with ``-`` for ``_``. The HTTP
# API takes the fields by their own names; tests/test_cli.py checks that both take every field, with one default.
SEARCH_FLAGS = {
    "calibration": "--calib", "evaluation": "--eval", "space.n_clusters": "--clusters", "space.fixed": "--fix",
    "finetune.steps": "--lora-steps", "finetune.lr": "--lora-lr", "finetune.r": "--lora-r",
    "finetune.alpha": "--lora-alpha", "finetune.batch_size": "--train-batch-size", "measure_cost": "--no-measure",
}


def search_job(args: argparse.Namespace):
    """The :class:`~adapruner.search.SearchJob` of a parsed ``search`` command (its first target's)."""
    from ..search import SearchJob, SearchSpace

    space = SearchSpace(
        metrics=tuple(args.metrics.split(",")) if args.metrics else SearchSpace.metrics,
        subset_mode=args.subset_mode, subset_size=args.subset_size, n_clusters=args.clusters,
        repairs=tuple(args.repairs.split(",")), scopes=tuple(args.scopes.split(",")),
        scores=tuple(args.scores.split(",")), depth=args.depth, aggregations=tuple(args.aggregations.split(",")),
        ridge=args.ridge, attn_share=args.attn_share, iterations=args.iterations, fixed=dict(args.fix or []),
    )
    return SearchJob(
        model=args.model, calibration=tuple(args.calib or SearchJob.calibration), evaluation=tuple(args.eval or ()),
        heldout=parse_heldout(args.heldout),
        target=args.target[0], trials=args.trials, sampler=args.sampler, pruner=args.pruner, seed=args.seed,
        pool_size=args.pool_size, seq_len=args.seq_len, val_windows=args.val_windows, test_windows=args.test_windows,
        baselines=tuple(b for b in args.baselines.split(",") if b), baseline_draws=args.baseline_draws, space=space,
        start=args.start, repair_windows=args.repair_windows, finalists=args.finalists,
        selection_windows=args.selection_windows,
        channel_multiple=args.channel_multiple, min_speedup=args.min_speedup,
        finetune=lora_from(args) if args.lora_steps else None,
        tasks=tuple(args.tasks or ()), task_limit=args.task_limit, export_dtype=args.export_dtype,
        export_format=args.export_format, gguf_type=args.gguf_type,
        measure_cost=args.measure_cost, cost_rounds=args.cost_rounds,
    )


def cmd_search(args: argparse.Namespace) -> int:
    from ..search import run_targets, write_tradeoff_report
    from ..tasks import check_tasks

    job = search_job(args)
    check_tasks(job.tasks)  # before the model loads
    if job.export_format == "gguf":
        from ..models import check_gguf_exportable
        from ..to_gguf import check_quant

        check_quant(job.gguf_type)
        check_gguf_exportable(job.model)
    name = args.study or job.default_study_name
    out = Path(args.out or Path("runs") / name)
    results = run_targets(job, args.target, args.storage, name, device=args.device, dtype=args.dtype, out_dir=out,
                          artifact_dir=args.artifacts)
    several = len(args.target) > 1
    for target, result in zip(args.target, results, strict=False):
        if several:
            print(f"target  {target:g} ({result.study.study_name})")
        print_result(result, out / f"r{target:g}" if several else out, args.storage)
    if several:
        print(f"trade-off {write_tradeoff_report([r.study for r in results], out)}")
    return 0


def speed_line(cost: dict) -> str:
    """The console's line on the best model's speed: a ratio only when it is not noise."""
    from ..inference_cost import ratio_text

    speed, spread = cost["speedups"]["best"], cost.get("spread", {}).get("best", {}).get("decode")
    decode = f"speed   decode {cost['models']['best']['decode_tokens_per_s']:.1f} tokens/s"
    memory = f"peak memory {speed['peak_memory']:.2f}x the unpruned model's"
    if spread is not None and spread["noisy"]:
        return (f"{decode}, {spread['median']:.2f}x ({spread['low']:.2f}-{spread['high']:.2f}) the unpruned "
                f"model's over {cost['rounds']} rounds: too noisy to be a result on this machine; {memory}")
    return f"{decode}, {ratio_text(speed['decode'], spread)}x the unpruned model's; {memory}"


def print_result(result, out: Path, storage: str) -> None:
    """What one target's search found: the best, its margin over LLM-Pruner, tasks, fine-tuning, where things are."""
    from ..search import (
        GGUF_NAME,
        StudyKey,
        TrialKey,
        baseline_trials,
        describe_config,
        load_line,
        margin_sentence,
        stored,
        write_report,
    )

    report = write_report(result.study, out)
    best = result.best_trial
    if best is not None:
        reference = baseline_trials(result.study).get("llm-pruner")
        if reference is not None and margin_sentence(best, reference):  # what the search is for comes first
            print(f"margin  {margin_sentence(best, reference)}")
        heldout = best.user_attrs.get(TrialKey.HELDOUT_PPL)
        print(f"best    trial {best.number}: validation ppl {best.value:.3f}, "
              f"test ppl {best.user_attrs.get(TrialKey.TEST_PPL, float('nan')):.3f}"
              + (f", held-out test ppl {heldout:.3f}" if heldout else ""))
        print(f"config  {describe_config(best.user_attrs[TrialKey.CONFIG])}")
        tasks = result.study.user_attrs.get(StudyKey.TASKS)
        if tasks and tasks["best_retained"] is not None:
            best_acc, limit = tasks["models"]["best"], tasks.get("limit")
            acc_se, share_se = best_acc.get("mean_acc_stderr"), tasks.get("best_retained_stderr")
            print(f"tasks   mean accuracy {best_acc['mean_acc']:.3f}" + (f" ± {acc_se:.3f}" if acc_se else "")
                  + f" on {', '.join(tasks['tasks'])}" + (f" ({limit} items each)" if limit else "") + ": "
                  + f"{tasks['best_retained']:.1%}" + (f" ± {share_se:.1%}" if share_se else "")
                  + " of the unpruned model's (± one standard error)")
        cost = result.study.user_attrs.get(StudyKey.INFERENCE_COST)
        if cost and "best" in cost["speedups"]:
            print(speed_line(cost))
    tuned = stored(result.study.user_attrs, StudyKey.FINETUNE)
    if tuned:
        print(f"LoRA    {tuned['steps']} steps: test ppl {tuned['test_ppl_before']:.3f} -> "
              f"{tuned['test_ppl_after']:.3f} ({tuned['seconds']:.0f}s)")
    print(f"report  {report}")
    if result.model_dir:
        print(f"model   {result.model_dir}  (artifact {result.artifact_id})")
        print(f"load    {load_line(best, str(result.model_dir))}")
        gguf = Path(result.model_dir).parent / GGUF_NAME
        if gguf.is_file():
            print(f"gguf    {gguf}; run: llama-cli -m {gguf}")
    print(f"study   {result.study.study_name} in {storage}  (optuna-dashboard {storage})")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``search`` command's flags."""
    from ..importance import AGGREGATIONS
    from ..plan import SCOPES
    from ..repair import REPAIR_MODES
    from ..search import (
        BASELINES,
        DEFAULT_BASELINES,
        PRUNERS,
        SAMPLERS,
        STARTS,
        SUBSET_MODES,
        SearchJob,
        SearchSpace,
    )

    p = sub.add_parser("search", help="Bayesian-optimization search for the best pruning configuration")
    add_model_args(p)
    p.add_argument("--target", "--ratio", dest="target", type=target_list, default=(SearchJob.target,),
                   metavar="TARGET[,TARGET...]",
                   help="share of ALL parameters to remove, in (0, 1), or a parameter count; several, comma-separated, "
                   f"run one study per target and report the trade-off (default: {SearchJob.target})")
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
                   help="validation and in-domain test source, repeatable (default: the calibration sources; add a "
                        "text you never calibrate on, such as builtin:jargon, to prefer models that carry beyond them)")
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
    p.add_argument("--min-speedup", type=positive(float, "--min-speedup"), default=None, metavar="X",
                   help="choose only a model predicted to decode at least X times as fast as the unpruned one in "
                   "llama.cpp (torch without it), from probe models timed on this machine; layers are then dropped "
                   "as needed (default: no floor)")
    p.add_argument("--selection-windows", type=not_negative(int, "--selection-windows"),
                   default=SearchJob.selection_windows,
                   help="validation windows per source added for that re-scoring (default: %(default)s)")
    p.add_argument("--metrics", default=None, help="metrics the mixture may use, comma-separated")
    p.add_argument("--subset-mode", "--calibration", dest="subset_mode", choices=SUBSET_MODES,
                   default=SearchSpace.subset_mode,
                   help="how a trial's calibration subset is chosen: clusters of the pool weighted per trial, a random "
                   "size and seed, or the whole pool (default: %(default)s)")
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
    p.add_argument("--iterations", type=iterations_range, default=SearchSpace.iterations, metavar="MIN:MAX",
                   help="steps FLAP's score may build the plan in, re-measured on the pruned model between them "
                   "(default: %(default)s; 1:1 for one step)")
    p.add_argument("--ridge", type=ridge_range, default=SearchSpace.ridge, metavar="MIN:MAX",
                   help="range of the repair's ridge, searched on a log scale (default: %(default)s)")
    p.add_argument("--attn-share", action=argparse.BooleanOptionalAction, default=SearchSpace.attn_share,
                   help="search the attention's share of the cut (else proportional to its size)")
    p.add_argument("--scopes", default=",".join(SearchSpace.scopes),
                   help=f"allocation scopes the search may choose, comma-separated, from {', '.join(SCOPES)}: a budget "
                   "per layer, or one ranking of every unit (FLAP's) (default: %(default)s)")
    p.add_argument("--no-measure", action="store_false", dest="measure_cost",
                   help="skip measuring the speed and memory of the unpruned model, the baselines and the best")
    p.add_argument("--cost-rounds", type=positive(int, "--cost-rounds"), default=SearchJob.cost_rounds,
                   help="interleaved rounds of that measurement, each model once per round (default: %(default)s)")
    p.add_argument("--depth", action=argparse.BooleanOptionalAction, default=SearchSpace.depth,
                   help="also search how many whole decoder layers to drop (0 .. a quarter of them, as far as the "
                   "target pays); --no-depth for width only; --fix drop_layers=N drops N in every trial "
                   "(default: on)")
    add_channel_multiple_arg(p)
    p.add_argument("--fix", type=parse_fixed, action="append", metavar="NAME=VALUE",
                   help="fix a search parameter, e.g. aggregation=sum or strength=0; repeatable")
    p.add_argument("--out", default=None, help="report and model folder (default: runs/STUDY)")
    add_export_dtype_arg(p)
    add_export_format_args(p)
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
