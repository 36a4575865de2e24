"""A pruned model whose layers kept different sizes, as a transformers model class.

The architecture's own class builds every layer at the config's one size; these subclasses then
rebuild each layer's projections at the size recorded for it in ``config.adapruner["layers"]``, so
``from_pretrained`` finds every weight the shape it has on disk.

This file is copied, as it is, into every export whose layers differ (``config.json`` names it in
its ``auto_map``): ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` then loads
the model on any machine with transformers, without AdaPruner. It must import nothing but torch and
transformers.
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

# The layout vocabulary of adapruner.structure, written again because this file travels alone;
# tests/test_structure_prune.py checks that the two agree.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
INPUT_SIDE = ("o_proj", "down_proj")  # projections whose input columns pruning removes


def resize_layers(model: nn.Module, sizes: list[dict[str, int]], output_bias: bool = False) -> None:
    """Replace each layer's projections by empty ones of its recorded sizes (the weights come next);
    ``output_bias``: o_proj and down_proj carry a bias (a repair's)."""
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.head_dim
    for layer, size in zip(model.model.layers, sizes, strict=True):
        kv, channels = size["num_key_value_heads"], size["intermediate_size"]
        units = {"q_proj": kv * n_rep * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim,
                 "o_proj": kv * n_rep * head_dim, "gate_proj": channels, "up_proj": channels, "down_proj": channels}
        for name, width in units.items():
            block = layer.self_attn if name in ATTENTION else layer.mlp
            linear = getattr(block, name)
            shape = (linear.out_features, width) if name in INPUT_SIDE else (width, linear.in_features)
            bias = linear.bias is not None or (output_bias and name in INPUT_SIDE)
            if (linear.out_features, linear.in_features) != shape or bias != (linear.bias is not None):
                setattr(block, name, nn.Linear(shape[1], shape[0], bias=bias, device=linear.weight.device,
                                               dtype=linear.weight.dtype))


class PerLayerSizes:
    """Mixin: build the architecture, then give each layer its recorded size."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        recorded = getattr(config, "adapruner", None) or {}
        if recorded.get("layers"):
            resize_layers(self, recorded["layers"], bool(recorded.get("output_bias")))


class PrunedLlamaForCausalLM(PerLayerSizes, LlamaForCausalLM):
    """Llama with per-layer sizes: what an export with cut or dropped layers loads as."""


class PrunedMistralForCausalLM(PerLayerSizes, MistralForCausalLM):
    """Mistral with per-layer sizes: what an export with cut or dropped layers loads as."""


class PrunedQwen2ForCausalLM(PerLayerSizes, Qwen2ForCausalLM):
    """Qwen2 with per-layer sizes: what an export with cut or dropped layers loads as."""


class PrunedQwen3ForCausalLM(PerLayerSizes, Qwen3ForCausalLM):
    """Qwen3 with per-layer sizes: what an export with cut or dropped layers loads as."""


PRUNED_CLASSES = {"llama": PrunedLlamaForCausalLM, "mistral": PrunedMistralForCausalLM,
                  "qwen2": PrunedQwen2ForCausalLM, "qwen3": PrunedQwen3ForCausalLM}
