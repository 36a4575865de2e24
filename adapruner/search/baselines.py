"""Baselines run as the first trials of every study, so each study shows them side by side.

* ``llm-pruner`` — LLM-Pruner's default as its own code computes it (``llama3.py`` block-wise,
  ``param_first``): element-wise first-order Taylor on 10 random calibration samples, summed over
  the group with LLM-Pruner's alignment of query heads to KV groups (metric ``llm_pruner``), the
  first four and last two layers spared. Checked side by side with LLM-Pruner's code (see
  docs/results.md): on the same windows in fp32 it removes the same groups.
* ``llm-pruner+repair`` — the same model, its kept o_proj/down_proj re-fitted by least squares
  (:mod:`adapruner.repair`, ``pool`` mode, the default ridge): the repair's gain apart from the search's.
* ``wanda-sp`` — structured Wanda as FLAP defines it: ``|W|·‖x‖`` on o_proj/down_proj columns
  (aggregation ``last``), all pool samples, every layer pruned uniformly.
* ``magnitude`` — weight magnitude (L2, the better of LLM-Pruner's two), LLM-Pruner's layer range.
* ``random`` — random groups, LLM-Pruner's layer range: the floor.
"""

from __future__ import annotations

from ..errors import AdaPrunerError
from ..importance import Mixture
from ..plan import Allocation
from ..repair import Repair
from ..session import PruneConfig, PruningSession

BASELINES = ("llm-pruner", "llm-pruner+repair", "wanda-sp", "magnitude", "random")
DEFAULT_BASELINES = ("llm-pruner", "llm-pruner+repair", "wanda-sp", "magnitude")


def baseline_config(name: str, session: PruningSession, seed: int = 0) -> PruneConfig:
    everything = tuple(range(len(session.pool)))
    llm_pruner_range = Allocation.llm_pruner(len(session.structure.layers))
    if name in ("llm-pruner", "llm-pruner+repair"):
        k = min(10, len(session.pool))
        repair = Repair("pool") if name.endswith("+repair") else Repair()
        return PruneConfig(Mixture.single("llm_pruner"), session.random_subset(k, seed), llm_pruner_range, repair)
    if name == "wanda-sp":
        return PruneConfig(Mixture.single("wanda_sp", "last"), everything, Allocation.named("uniform"))
    if name == "magnitude":
        return PruneConfig(Mixture.single("magnitude_l2"), everything, llm_pruner_range)
    if name == "random":
        return PruneConfig(Mixture.single("random", seed=seed), everything, llm_pruner_range)
    raise AdaPrunerError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")
