"""How fast a pruned model decodes, predicted from its shape before it is built: a model of the time per token,
fitted to a few probe models measured in the runtime that will serve it.

Decoding one token runs every kept decoder layer once, reading each of its weights once; the rest (embedding
row, final norm, output projection, the runtime's own work) is the same for every pruned model. So

    seconds per token  ≈  base + per_layer · kept layers + per_weight · weights of the kept layers

where ``per_layer`` is the cost of a layer whatever its width (kernel launches, norms, attention over the
cache, thread hand-offs: what dominates a small model in llama.cpp on a fast CPU) and ``per_weight`` the cost
of reading and multiplying one weight. The two depend on the machine, its threads and the runtime: on one 2-core
machine 40% of the weights removed by width alone decoded 1.05x as fast in llama.cpp, on another 1.6x. So the
coefficients are measured, not assumed: :func:`measure_decode_time` times :func:`probe_plans`' models (the
unpruned one, half its layers dropped, every layer at half width, and a quarter dropped with the rest at three
quarters) in interleaved rounds, and :meth:`DecodeTime.fit` solves for the three coefficients by least squares.
``base`` may come out negative (a smaller model fits the caches better than a straight line says); the model is
meant for shapes between the probes', where it is checked (``residuals``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .errors import AdaPrunerError
from .export import save_pruned
from .inference_cost import measure_interleaved
from .llama_runtime import measure_gguf_interleaved
from .plan import LayerPlan, PruningPlan
from .prune import prune_model
from .structure import ModelStructure, model_structure
from .to_gguf import write_gguf

RUNTIMES = ("llama.cpp", "torch")
PROBE_TOKENS = 64  # decoded per probe and round
PROBE_ROUNDS = 5
# The shortest time per token a prediction may give, as a share of the unpruned model's: a floor for shapes far
# outside the probes', where a negative base would otherwise predict an infinite speed-up.
MIN_SHARE = 0.05


@dataclass(frozen=True)
class Probe:
    """One measured model: its kept layers, their weights, and its median seconds per decoded token."""

    label: str
    layers: int
    weights: int
    seconds: float


@dataclass(frozen=True)
class DecodeTime:
    """Seconds per decoded token as ``base + per_layer · layers + per_weight · weights`` (see the module
    docstring), fitted to ``probes``, the first of which is the unpruned model; ``runtime`` says where they ran."""

    base: float
    per_layer: float
    per_weight: float
    runtime: str
    probes: tuple[Probe, ...]

    @classmethod
    def fit(cls, probes: Sequence[Probe], runtime: str) -> DecodeTime:
        """Least squares over the probes (at least three, of at least two layer counts and two widths)."""
        if len(probes) < 3 or len({p.layers for p in probes}) < 2 or len({p.weights / p.layers for p in probes}) < 2:
            raise AdaPrunerError("a decode-time model needs at least three probes of different depths and widths")
        design = torch.tensor([[1.0, p.layers, p.weights / 1e6] for p in probes], dtype=torch.float64)
        seconds = torch.tensor([[p.seconds] for p in probes], dtype=torch.float64)
        base, per_layer, per_mweight = torch.linalg.lstsq(design, seconds).solution.flatten().tolist()
        return cls(base, per_layer, per_mweight / 1e6, runtime, tuple(probes))

    @property
    def unpruned(self) -> Probe:
        return self.probes[0]

    def seconds(self, layers: int, weights: int) -> float:
        """Predicted seconds per token of a model with ``layers`` decoder layers holding ``weights`` weights."""
        predicted = self.base + self.per_layer * layers + self.per_weight * weights
        full = self.base + self.per_layer * self.unpruned.layers + self.per_weight * self.unpruned.weights
        return max(predicted, MIN_SHARE * full)

    def speedup(self, layers: int, weights: int) -> float:
        """Predicted decode tokens/s over the unpruned model's."""
        return self.seconds(self.unpruned.layers, self.unpruned.weights) / self.seconds(layers, weights)

    def speedup_of(self, structure: ModelStructure, plan: PruningPlan) -> float:
        return self.speedup(*kept_weights(structure, plan))

    @property
    def residuals(self) -> dict[str, float]:
        """Each probe's measured over predicted time, minus one (how well the line fits)."""
        return {p.label: p.seconds / self.seconds(p.layers, p.weights) - 1 for p in self.probes}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> DecodeTime:
        return cls(**{**data, "probes": tuple(Probe(**p) for p in data["probes"])})


def kept_weights(structure: ModelStructure, plan: PruningPlan) -> tuple[int, int]:
    """The decoder layers ``plan`` keeps, and their weights (norms included)."""
    weights = 0
    for i in plan.kept_layers:
        shape, kept = structure.layers[i], plan.layers[i]
        weights += (shape.params - (shape.n_groups - len(kept.keep_groups)) * shape.group_params
                    - (shape.n_channels - len(kept.keep_channels)) * shape.channel_params)
    return len(plan.kept_layers), weights


def probe_plans(structure: ModelStructure) -> dict[str, PruningPlan]:
    """The probes' plans: the unpruned model, the middle half of its layers dropped, every layer at half width,
    and the middle quarter dropped with the rest at three quarters of their width."""
    n = len(structure.layers)

    def plan(dropped: range, width: float) -> PruningPlan:
        layers = tuple(LayerPlan(tuple(range(max(1, round(s.n_groups * width)))),
                                 tuple(range(max(1, round(s.n_channels * width))))) for s in structure.layers)
        draft = PruningPlan(layers, 0, structure.total_params, tuple(dropped))
        removed = sum(s.params for s in structure.layers) - kept_weights(structure, draft)[1]
        return PruningPlan(layers, removed, structure.total_params, tuple(dropped))

    return {"unpruned": PruningPlan.keep_all(structure),
            "half the layers": plan(range(n // 4, n // 4 + n // 2), 1.0),
            "half width": plan(range(0), 0.5),
            "a quarter of the layers, 3/4 width": plan(range(3 * n // 8, 3 * n // 8 + n // 4), 0.75)}


def measure_decode_time(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None,
                        runtime: str = "torch", quant: str = "q4_k_m", rounds: int = PROBE_ROUNDS,
                        new_tokens: int = PROBE_TOKENS, threads: int | None = None) -> DecodeTime:
    """Build the probe models from ``model`` and time their decoding in ``runtime``: ``torch`` where ``model``
    is (device and dtype), or ``llama.cpp``, each probe written as a GGUF file of type ``quant`` (needs
    ``tokenizer``). Interleaved rounds; each probe's median."""
    if runtime not in RUNTIMES:
        raise AdaPrunerError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    structure = model_structure(model)
    plans = probe_plans(structure)
    if runtime == "torch":
        models = {label: prune_model(model, plan, share_unchanged=True) for label, plan in plans.items()}
        costs, _ = measure_interleaved(models, repeats=rounds, new_tokens=new_tokens, prefill_shapes=((1, 8),))
        where = f"torch {costs['unpruned'].device} {costs['unpruned'].dtype}"
    else:
        with tempfile.TemporaryDirectory(prefix="adapruner-probes-") as tmp:
            files = {}
            for i, (label, plan) in enumerate(plans.items()):
                folder = save_pruned(prune_model(model, plan, share_unchanged=True), tokenizer, Path(tmp) / f"p{i}")
                files[label] = write_gguf(folder, Path(tmp) / f"p{i}.gguf", quant, progress=False)
            costs, _ = measure_gguf_interleaved(files, repeats=rounds, new_tokens=new_tokens, threads=threads)
        where = f"llama.cpp {quant}, {costs['unpruned'].threads} threads"
    probes = [Probe(label, *kept_weights(structure, plan), 1.0 / costs[label].decode_tokens_per_s)
              for label, plan in plans.items()]
    return DecodeTime.fit(probes, where)
