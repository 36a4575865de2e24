"""``adapruner eval``: perplexity of a model on text sources, and accuracy on lm-eval tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import add_eval_args, add_model_args, batch_size, data_specs, not_negative, positive, task_list


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import eval_windows, load_source
    from ..evaluate import perplexity
    from ..models import load_model
    from ..tasks import BUILTIN_TASKS, check_tasks, evaluate_tasks, headline, hub_task_names, mean_accuracy

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` command's flags."""
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
