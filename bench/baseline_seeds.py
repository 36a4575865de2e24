"""The ``llm-pruner`` baseline as a study builds it, per calibration seed, at LLM-Pruner's own size.

SmolLM2-135M, calibration pool of 64 windows of ``builtin:books`` (seed *s*), the baseline's 10-window
draw, 28,021,248 parameters removed (what LLM-Pruner's ``llama3.py`` removes at ratio 0.3282, layers
4..27); test perplexity on the whole test parts (books: 128 windows of *Persuasion*, wiki 128, news
57), to set beside LLM-Pruner's own code on its own draws (docs/results.md). Also the same groups
re-fitted (``llm-pruner+repair``).

    python bench/baseline_seeds.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time

from adapruner.evaluate import perplexity
from adapruner.search import baseline_config
from adapruner.search.objective import geometric_mean
from adapruner.session import PruningSession

LLM_PRUNER_REMOVES = 28_021_248


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        session = PruningSession.open("smollm2-135m", ["builtin:books"], pool_size=64, seed=seed,
                                      heldout=["builtin:wiki", "builtin:news"], max_eval_windows=128, progress=False)
        for name in ("llm-pruner", "llm-pruner+repair"):
            start = time.time()
            model, plan = session.prune(baseline_config(name, session, seed), LLM_PRUNER_REMOVES)
            built = time.time() - start
            sources = [*session.eval_sources, *session.heldout_sources]
            ppl = {s.name: perplexity(model, session.source_windows(s, "test"), 8, progress=False).ppl for s in sources}
            print(f"seed {seed} {name}: removed {plan.removed_params:,} ({plan.removed_share:.4%}); "
                  + ", ".join(f"{k} {v:.2f} ({session.source_windows(s, 'test').shape[0]} windows)"
                              for s, (k, v) in zip(sources, ppl.items(), strict=True))
                  + f"; geo {geometric_mean(ppl.values()):.2f}; built in {built:.0f}s", flush=True)


if __name__ == "__main__":
    main()
