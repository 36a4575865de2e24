"""Screen a lever on development texts before a bench: configurations scored on text no study reports.

SmolLM2-135M at ``--target`` (28,021,248 parameters removed by default: the leave-one-source-out bench's 20.83%),
calibrated on books + wiki (the 64-window pool of ``--seed``). Each ``--config`` is a baseline's configuration
(``--base``, FLAP's by default: its score, global ranking, the whole pool) with the fields given changed, e.g.
``repair=pool,scope=layer,iterations=3``: the allocation's ``first``, ``last``, ``strength``, ``attn_share``,
``drop_layers`` and ``scope``, the repair's ``repair`` (mode) and ``ridge``, and ``iterations``. Each is scored on
the first ``--windows`` validation windows of books and of wiki and of each ``--text`` (a file, a folder or a
built-in source such as ``builtin:jargon``), their geometric mean over the texts last. It never reads a test part
or news, the sources the leave-one-source-out bench reports on; write down what would decide the lever before it
runs. Earlier screens, by scratch scripts that did the same: docs/results.md, "Four levers screened on text no
study reports".

    python bench/screen.py --text builtin:jargon --text /tmp/devtext/kjv/kjv.txt \\
        --config repair=pool --config repair=pool,iterations=3 --config repair=pool,scope=layer,iterations=3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

from adapruner.data import BUILTIN_SOURCES
from adapruner.errors import AdaPrunerError
from adapruner.repair import Repair
from adapruner.search import baseline_config
from adapruner.search.objective import geometric_mean, mean_perplexity
from adapruner.session import PruneConfig, PruningSession

CALIBRATION = ("builtin:books", "builtin:wiki")
ALLOCATION_FIELDS = ("first", "last", "strength", "attn_share", "drop_layers", "scope")


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def changed(config: PruneConfig, spec: str) -> PruneConfig:
    """``config`` with the fields of ``spec`` (``name=value,...``; see the module docstring) changed."""
    fields = dict(item.split("=", 1) for item in spec.split(",") if item)
    values = {name: _value(text) for name, text in fields.items()}
    unknown = sorted(set(values) - {*ALLOCATION_FIELDS, "repair", "ridge", "iterations"})
    if unknown:
        raise AdaPrunerError(f"cannot change {unknown[0]!r} (choose from {', '.join(ALLOCATION_FIELDS)}, repair, "
                             "ridge, iterations)")
    allocation = dataclasses.replace(config.allocation, **{k: v for k, v in values.items() if k in ALLOCATION_FIELDS})
    repair = Repair(values.get("repair", config.repair.mode), values.get("ridge", config.repair.ridge))
    return dataclasses.replace(config, allocation=allocation, repair=repair,
                               iterations=values.get("iterations", config.iterations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="fields changed from --base (repeatable; "
                        "an empty string: the base itself)")
    parser.add_argument("--text", action="append", default=[], help="a development text (repeatable)")
    parser.add_argument("--base", default="flap", help="the baseline whose configuration is changed")
    parser.add_argument("--target", type=_value, default=28021248, help="parameters removed, or a ratio")
    parser.add_argument("--windows", type=int, default=64, help="validation windows per text")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reported = sorted({text.removeprefix("builtin:") for text in args.text} & set(BUILTIN_SOURCES))
    if reported:
        parser.error(f"--text builtin:{reported[0]}: a source the leave-one-source-out bench reports on, not a "
                     "development text")
    try:
        session = PruningSession.open(args.model, list(CALIBRATION), [*CALIBRATION, *args.text], seed=args.seed,
                                      heldout=[], max_eval_windows=args.windows, progress=False)
        base = baseline_config(args.base, session, args.seed, target=args.target)
        configs = {spec or args.base: changed(base, spec) for spec in args.config or [""]}
    except AdaPrunerError as error:
        sys.exit(f"screen: {error}")
    names = [source.name for source in session.eval_sources]
    print(f"| configuration ({args.base}'s, changed) | {' | '.join(names)} | texts, geometric mean | seconds |")
    print(f"|---|{'---:|' * (len(names) + 2)}")
    for name, config in configs.items():
        start = time.perf_counter()
        pruned, _ = session.prune(config, args.target, share_unchanged=True)
        ppl = [mean_perplexity(pruned, session.source_windows(source, "validation"))
               for source in session.eval_sources]
        texts = geometric_mean(ppl[len(CALIBRATION):]) if args.text else math.nan
        cells = " | ".join(f"{p:.2f}" for p in ppl)
        print(f"| {name} | {cells} | {texts:.2f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
