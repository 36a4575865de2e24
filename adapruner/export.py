"""Save and load pruned models: safetensors weights, a ``config.json`` recording per-layer sizes,
and the tokenizer.

When every layer kept the same sizes the config is an ordinary one, and the folder loads with plain
``AutoModelForCausalLM.from_pretrained``. Otherwise :func:`load_pruned` rebuilds the model: the
architecture from the config, each layer's projections at their recorded sizes, then the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .device import resolve_device, resolve_dtype
from .errors import AdaPrunerError
from .structure import ATTN_MODULES, COLUMN_MODULES, decoder_layers, layer_linears, model_structure, set_layer_sizes


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: str | Path,
    info: dict | None = None,
) -> Path:
    """Write ``model`` (pruned or not) to ``folder``; ``info`` is stored in the config's ``adapruner`` entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if not hasattr(config, "adapruner"):
        structure = model_structure(model)
        set_layer_sizes(config, structure.sizes(), structure.layers[0].head_dim)
    if info:
        config.adapruner = {**config.adapruner, **info}
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _resize_layers(model: nn.Module, sizes: list[dict[str, int]]) -> None:
    """Replace each layer's projections by empty ones of the recorded sizes (weights come next)."""
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.head_dim
    for layer, size in zip(decoder_layers(model), sizes, strict=True):
        linears = layer_linears(layer)
        kv, channels = size["num_key_value_heads"], size["intermediate_size"]
        units = {"q_proj": kv * n_rep * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim,
                 "o_proj": kv * n_rep * head_dim, "gate_proj": channels, "up_proj": channels, "down_proj": channels}
        for name, linear in linears.items():
            columns = name in COLUMN_MODULES
            shape = (linear.out_features, units[name]) if columns else (units[name], linear.in_features)
            if (linear.out_features, linear.in_features) == shape:
                continue
            new = nn.Linear(shape[1], shape[0], bias=linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
            setattr(layer.self_attn if name in ATTN_MODULES else layer.mlp, name, new)


def load_pruned(
    folder: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Rebuild a model saved by :func:`save_pruned`; returns it in eval mode with its tokenizer."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AdaPrunerError(f"no pruned model in {folder} (config.json missing)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(folder)
    sizes = getattr(config, "adapruner", {}).get("layers")
    if sizes is None:
        raise AdaPrunerError(f"{folder} was not written by adapruner (no per-layer sizes in config.json)")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise AdaPrunerError(f"no safetensors weights in {folder}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    _resize_layers(model, sizes)
    state = {}
    for shard in shards:
        state |= load_file(str(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise AdaPrunerError(f"weights in {folder} do not match its config: missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    model.to(device=dev, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer
