"""The repair's modes and its ridge, on LLM-Pruner's own choice of groups: perplexity and seconds.

SmolLM2-135M at ``--ratio``, calibrated on books + wiki (pool of 64 windows), LLM-Pruner's default
plan (the ``llm-pruner`` baseline's groups), then re-fitted with each repair setting. Reported: test
perplexity on books and wiki (the calibration sources' test parts) and news (never seen), and the
seconds each re-fit took, the repair windows' moments measured once beforehand (their cost is printed apart).
A diagnostic of the mechanism, not a tuning run: the search's defaults were set before it.

    python bench/repair_modes.py
"""

from __future__ import annotations

import argparse
import time

from adapruner.evaluate import perplexity
from adapruner.prune import prune_model
from adapruner.repair import Repair
from adapruner.search import baseline_config
from adapruner.session import PruningSession

SETTINGS = (Repair(), Repair("bias"), Repair("pool", 1e-3), Repair("pool", 1e-2), Repair("pool", 1e-1),
            Repair("pool", 1.0), Repair("pool", 10.0), Repair("sequential", 1e-2), Repair("sequential", 1e-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-windows", type=int, default=32)
    args = parser.parse_args()
    session = PruningSession.open("smollm2-135m", ["builtin:books", "builtin:wiki"], pool_size=64, seed=args.seed,
                                  heldout=["builtin:news"], max_eval_windows=args.test_windows, progress=False)
    config = baseline_config("llm-pruner", session, args.seed)
    plan = session.plan(config, args.ratio)
    start = time.perf_counter()
    session.moments  # noqa: B018  (the repair windows' input moments, once per job)
    print(f"Input moments of {session.repair_pool.shape[0]} repair windows: {time.perf_counter() - start:.1f} s "
          "once per job. Plan: LLM-Pruner's, "
          f"{plan.removed_share:.2%} removed.\n")
    sources = [*session.eval_sources, *session.heldout_sources]
    print("| repair | ridge | " + " | ".join(s.name for s in sources) + " | seconds per re-fit |")
    print("|---|---:|" + "---:|" * len(sources) + "---:|")
    for repair in SETTINGS:
        pruned = prune_model(session.model, plan)
        start = time.perf_counter()
        session.repair(pruned, plan, repair)
        seconds = time.perf_counter() - start
        ppl = [perplexity(pruned, session.source_windows(s, "test"), 8, progress=False).ppl for s in sources]
        ridge = "—" if not repair.enabled else f"{repair.ridge:g}"
        print(f"| {repair.mode} | {ridge} | " + " | ".join(f"{p:.2f}" for p in ppl) + f" | {seconds:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
