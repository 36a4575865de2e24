"""The prunable groups of a LLaMA-family decoder.

Per layer there are two kinds of group:

* **attention groups** — one KV head together with the ``n_rep`` query heads that share it (GQA;
  ``n_rep = 1`` without GQA). Group ``g`` owns rows ``[g*n_rep*d, (g+1)*n_rep*d)`` of ``q_proj`` and
  the matching columns of ``o_proj``, and rows ``[g*d, (g+1)*d)`` of ``k_proj`` and ``v_proj``
  (``d`` = head_dim), biases included (Qwen2). Qwen3's ``q_norm``/``k_norm`` act on ``head_dim`` and
  are shared by all heads, so they are untouched.
* **MLP channels** — channel ``j`` owns row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j``
  of ``down_proj``.

Shapes are read from the modules themselves, so a model pruned earlier (whose layers differ in size)
is described as correctly as an unpruned one. This module is the bottom of the library's vocabulary of
layouts: which model types are supported, and how per-layer sizes are written into a config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

# Architectures sharing the self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj layout we prune.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# Modules whose *input* dimension holds the groups; the others hold them in their output rows.
COLUMN_MODULES = ("o_proj", "down_proj")


@dataclass(frozen=True)
class LayerShape:
    """The prunable shape of one decoder layer: attention groups and their heads, MLP channels, biases."""

    n_groups: int  # attention groups (KV heads)
    n_rep: int  # query heads per KV head
    head_dim: int
    n_channels: int  # MLP channels
    hidden: int
    qkv_bias: bool
    mlp_bias: bool
    other_params: int = 0  # norms and anything else the layer holds besides its projections

    @property
    def params(self) -> int:
        """Parameters removed with the whole layer."""
        return self.prunable_params + self.other_params

    def rows_per_group(self, module: str) -> int:
        """How many rows (or columns, for o_proj) of ``module`` one attention group owns."""
        return self.n_rep * self.head_dim if module in ("q_proj", "o_proj") else self.head_dim

    @property
    def group_params(self) -> int:
        """Parameters removed with one attention group."""
        per_head_rows = (2 * self.n_rep + 2) * self.head_dim  # q and o: n_rep heads each; k, v: one
        bias = (self.n_rep + 2) * self.head_dim if self.qkv_bias else 0
        return per_head_rows * self.hidden + bias

    @property
    def channel_params(self) -> int:
        """Parameters removed with one MLP channel."""
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    @property
    def prunable_params(self) -> int:
        return self.n_groups * self.group_params + self.n_channels * self.channel_params


@dataclass(frozen=True)
class ModelStructure:
    """A model's architecture as pruning sees it: one :class:`LayerShape` per decoder layer, and its size."""

    model_type: str
    layers: tuple[LayerShape, ...]
    total_params: int

    @property
    def prunable_params(self) -> int:
        return sum(layer.prunable_params for layer in self.layers)

    def sizes(self) -> list[dict[str, int]]:
        return [{"num_key_value_heads": s.n_groups, "intermediate_size": s.n_channels} for s in self.layers]


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}: AdaPruner prunes {', '.join(SUPPORTED_MODEL_TYPES)} "
            "models (the self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj layout)"
        )


def set_layer_sizes(config, sizes: list[dict[str, int]], head_dim: int) -> None:
    """Record per-layer sizes in the config; when all layers agree, make it a plain config too."""
    n_rep = config.num_attention_heads // config.num_key_value_heads
    config.head_dim = head_dim  # no longer hidden_size / num_attention_heads once heads are removed
    config.adapruner = {**getattr(config, "adapruner", {}), "layers": sizes}
    if all(s == sizes[0] for s in sizes):
        config.num_key_value_heads = sizes[0]["num_key_value_heads"]
        config.num_attention_heads = sizes[0]["num_key_value_heads"] * n_rep
        config.intermediate_size = sizes[0]["intermediate_size"]


def set_output_bias(config) -> None:
    """Record that every o_proj and down_proj carries a bias (a repair's: :mod:`adapruner.repair`), which the
    architecture's own layers lack; an export then builds them with one."""
    config.adapruner = {**getattr(config, "adapruner", {}), "output_bias": True}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.model.layers
    except AttributeError:
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers decoder stack") from None


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The seven prunable Linear modules of one decoder layer, by short name."""
    try:
        found = {name: getattr(layer.self_attn, name) for name in ATTN_MODULES}
        found |= {name: getattr(layer.mlp, name) for name in MLP_MODULES}
    except AttributeError as exc:
        raise UnsupportedModelError(f"decoder layer lacks the expected projection: {exc}") from None
    for name, module in found.items():
        if not isinstance(module, nn.Linear):
            raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not nn.Linear")
    return found


def model_structure(model: nn.Module) -> ModelStructure:
    config = model.config
    check_supported(config)
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = []
    for layer in decoder_layers(model):
        lin = layer_linears(layer)
        projections = sum(p.numel() for linear in lin.values() for p in linear.parameters())
        n_groups, rem = divmod(lin["k_proj"].out_features, head_dim)
        if rem or lin["q_proj"].out_features != n_groups * n_rep * head_dim:
            raise UnsupportedModelError("q/k projection sizes do not match the config's heads and head_dim")
        shapes.append(LayerShape(
            n_groups=n_groups, n_rep=n_rep, head_dim=head_dim, n_channels=lin["gate_proj"].out_features,
            hidden=lin["q_proj"].in_features, qkv_bias=lin["q_proj"].bias is not None,
            mlp_bias=lin["gate_proj"].bias is not None,
            other_params=sum(p.numel() for p in layer.parameters()) - projections,
        ))
    total = sum(p.numel() for p in model.parameters())
    return ModelStructure(config.model_type, tuple(shapes), total)


def group_index(shape: LayerShape, module: str, groups: torch.Tensor) -> torch.Tensor:
    """Row (or column, for o_proj/down_proj) indices of ``module`` owned by the given groups."""
    if module in MLP_MODULES:
        return groups
    width = shape.rows_per_group(module)
    return (groups[:, None] * width + torch.arange(width, device=groups.device)).flatten()
