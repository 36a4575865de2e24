"""Baselines run as the first trials of every study, so each study shows them side by side.

* ``llm-pruner`` — LLM-Pruner's default as its own code computes it (``llama3.py`` block-wise,
  ``param_first``): element-wise first-order Taylor on 10 random calibration samples, summed over
  the group with LLM-Pruner's alignment of query heads to KV groups (metric ``llm_pruner``), the
  first four and last two layers spared. Checked side by side with LLM-Pruner's code (see
  docs/results.md): on the same windows in fp32 it removes the same groups.
* ``llm-pruner+repair`` — the same model, its kept o_proj/down_proj repaired (:mod:`adapruner.repair`,
  ``pool`` mode, the ridge by its rule): the repair's gain apart from the search's.
* ``flap`` — FLAP (An et al., AAAI 2024) as its code computes it (``prune_flap``, ``WIFV``, ``AL-AM``):
  fluctuation scores standardised per layer (metric ``flap``), one ranking of every group and channel of
  every layer (allocation scope ``global``), and its bias compensation (repair mode ``bias``). Checked side
  by side with FLAP's code (docs/results.md).
* ``wanda-sp`` — structured Wanda as FLAP's code computes it (``prune_wanda_sp``): ``|W|·‖x‖`` of o_proj and
  down_proj columns, scored layer by layer on the already pruned layers' activations
  (``wanda_sp_sequential``), every layer losing the same share of its parameters: ``⌊r · groups⌋`` KV groups
  (FLAP's ``int(ratio * heads)``, per KV group on GQA models) and MLP channels for the rest.
* ``magnitude`` — weight magnitude (L2, the better of LLM-Pruner's two), LLM-Pruner's layer range.
* ``random`` — random groups, LLM-Pruner's layer range: the floor.

A baseline that draws its calibration samples (or its groups) at random is scored over several draws
(:data:`DRAWN`; a job's ``baseline_draws``, 3 by default): one draw of LLM-Pruner's 10 windows moves its
perplexity by half, and what a user of it gets is the mean over draws, which margins are taken against.
"""

from __future__ import annotations

import math

from ..errors import AdaPrunerError
from ..importance import Mixture
from ..plan import Allocation, params_to_remove
from ..repair import Repair
from ..session import PruneConfig, PruningSession

BASELINES = ("llm-pruner", "llm-pruner+repair", "flap", "wanda-sp", "magnitude", "random")
DEFAULT_BASELINES = ("llm-pruner", "llm-pruner+repair", "flap", "wanda-sp")
DRAWN = ("llm-pruner", "llm-pruner+repair", "random")  # draw calibration samples (or groups) at random
REFERENCE = "llm-pruner"  # what margins are printed against


def draws(name: str, baseline_draws: int) -> range:
    """The draws a study scores ``name`` over: ``baseline_draws`` for a baseline that draws, else one."""
    return range(baseline_draws if name in DRAWN else 1)


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw ``draw`` of a study seeded with ``seed`` (draw 0 keeps the study's seed)."""
    return seed + 1000 * draw


def wanda_sp_attention_share(session: PruningSession, target: float | int) -> float:
    """The share of each layer's budget that ``⌊r · groups⌋`` KV groups take, ``r`` being the share of the
    prunable parameters the target removes (FLAP's wanda-sp removes ``int(ratio * heads)`` heads per layer)."""
    structure = session.structure
    r = params_to_remove(structure, target) / structure.prunable_params
    shape = structure.layers[0]
    return min(1.0, math.floor(r * shape.n_groups) * shape.group_params / (r * shape.prunable_params))


def baseline_config(name: str, session: PruningSession, seed: int = 0, draw: int = 0,
                    target: float | int | None = None) -> PruneConfig:
    """The configuration of baseline ``name`` on ``session``: its ``draw``-th calibration draw of a study seeded
    with ``seed``; ``target`` (the pruning target) for ``wanda-sp``, whose attention share depends on it."""
    everything = tuple(range(len(session.pool)))
    llm_pruner_range = Allocation.llm_pruner(len(session.structure.layers))
    seed = draw_seed(seed, draw)
    if name in ("llm-pruner", "llm-pruner+repair"):
        k = min(10, len(session.pool))
        repair = Repair("pool") if name.endswith("+repair") else Repair()
        return PruneConfig(Mixture.single("llm_pruner"), session.random_subset(k, seed), llm_pruner_range, repair)
    if name == "flap":
        return PruneConfig(Mixture.single("flap"), everything, Allocation(scope="global"), Repair("bias"))
    if name == "wanda-sp":
        if target is None:
            raise AdaPrunerError("the wanda-sp baseline needs the pruning target")
        share = wanda_sp_attention_share(session, target)
        return PruneConfig(Mixture.single("wanda_sp_sequential", "last"), everything, Allocation(attn_share=share))
    if name == "magnitude":
        return PruneConfig(Mixture.single("magnitude_l2"), everything, llm_pruner_range)
    if name == "random":
        return PruneConfig(Mixture.single("random", seed=seed), everything, llm_pruner_range)
    raise AdaPrunerError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")
