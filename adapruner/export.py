"""Save and load pruned models: safetensors weights, a ``config.json`` recording per-layer sizes,
the tokenizer and a model card (``README.md``).

When every layer kept the same sizes the config is an ordinary one, and the folder loads with plain
``AutoModelForCausalLM.from_pretrained``. Otherwise the folder carries :mod:`.modeling_pruned`, named
in ``config.json``'s ``auto_map``: ``from_pretrained(folder, trust_remote_code=True)`` loads it on any
machine with transformers, AdaPruner or not; :func:`load_pruned` builds the same class without the flag.

The weights are written in the dtype asked for (commands ask for the unpruned checkpoint's, bf16 for
SmolLM2, where the search ran in fp32 on a CPU): the shards are cast one at a time after saving, so
casting never holds a second copy of the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import modeling_pruned
from .device import resolve_device, resolve_dtype
from .errors import AdaPrunerError
from .modeling_pruned import PRUNED_CLASSES
from .structure import model_structure, set_layer_sizes
from .to_gguf import GGUF_TOKENIZER

MODELING_FILE = Path(modeling_pruned.__file__).name


def load_instructions(folder: str | Path, uniform: bool) -> str:
    """The line of code that loads an export."""
    remote = "" if uniform else ", trust_remote_code=True"
    return f'AutoModelForCausalLM.from_pretrained("{folder}"{remote})'


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: str | Path,
    info: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (pruned or not) to ``folder``, its floating-point weights in ``dtype`` (default: as
    they are); ``info`` is stored in the config's ``adapruner`` entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if not hasattr(config, "adapruner"):
        structure = model_structure(model)
        set_layer_sizes(config, structure.sizes(), structure.layers[0].head_dim)
    if info:
        config.adapruner = {**config.adapruner, **info}
    sizes = config.adapruner["layers"]
    uniform = all(size == sizes[0] for size in sizes) and not config.adapruner.get("output_bias")
    if not uniform:  # the layers differ (or carry a repair's bias): ship the class that builds them
        pruned_class = PRUNED_CLASSES[config.model_type]
        config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{pruned_class.__name__}"}
        shutil.copyfile(modeling_pruned.__file__, folder / MODELING_FILE)
    model.save_pretrained(folder, safe_serialization=True)
    if dtype is not None and dtype != next(model.parameters()).dtype:
        cast_checkpoint(folder, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        settings = Path(tokenizer.name_or_path or "") / GGUF_TOKENIZER  # a GGUF source's tokenizer settings
        if settings.is_file() and settings.resolve() != (folder / GGUF_TOKENIZER).resolve():
            shutil.copyfile(settings, folder / GGUF_TOKENIZER)
    (folder / "README.md").write_text(model_card(config, uniform, folder))
    return folder


def cast_checkpoint(folder: Path, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors of ``folder``'s safetensors shards to ``dtype``, shard by shard, and
    record it in ``config.json``."""
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in load_file(str(shard)).items()}
        save_file(tensors, str(shard), metadata=metadata)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_card(config, uniform: bool, folder: Path) -> str:
    """A model card: what was pruned, how far, the configuration found, its perplexities, how to load it."""
    info = config.adapruner
    lines = ["---", "library_name: transformers", "tags: [pruned, adapruner]", "---", "",
             f"# {info.get('base_model', 'model')}, pruned by AdaPruner", ""]
    if info.get("removed_share") is not None:
        lines.append(f"- parameters removed: {info['removed_share']:.2%} of all")
    for key in ("target", "trial", "val_ppl", "test_ppl", "heldout_ppl"):
        if info.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {info[key]}")
    sizes = info["layers"]
    lines.append(f"- layers: {len(sizes)}; attention (KV) groups kept per layer "
                 f"{[s['num_key_value_heads'] for s in sizes]}; MLP channels kept per layer "
                 f"{[s['intermediate_size'] for s in sizes]}")
    if info.get("config"):
        lines += ["", "Configuration found:", "", "```json", json.dumps(info["config"], indent=1), "```"]
    lines += ["", "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = {load_instructions(folder.name, uniform)}",
              f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")', "```", ""]
    if not uniform:
        lines += [f"Its layers kept different sizes, so the folder carries `{MODELING_FILE}`, a subclass of "
                  "the architecture's own class that builds each layer at its size (no other code); "
                  "`trust_remote_code=True` lets transformers use it. AdaPruner need not be installed.", ""]
    lines += ["## Run in llama.cpp, Ollama or LM Studio", "",
              "Write it as one GGUF file (llama.cpp's own quantizer makes q8_0 and q4_k_m), then run it:", "",
              "```bash", f"adapruner export {folder.name} --out {folder.name}.gguf --quant q4_k_m",
              f"llama-cli -m {folder.name}.gguf", "```", "",
              f"Ollama: a `Modelfile` holding `FROM ./{folder.name}.gguf`, then "
              f"`ollama create {folder.name} -f Modelfile` and `ollama run {folder.name}`.", ""]
    if not uniform:
        lines += ["Its layers differ, so the file uses llama.cpp's `deci` architecture, which gives every layer "
                  "its own sizes; vLLM cannot serve this export (its Nemotron-NAS support has one query-head "
                  "count for all layers).", ""]
    return "\n".join(lines)


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
    if config.model_type not in PRUNED_CLASSES:
        raise AdaPrunerError(f"{folder}: unsupported architecture {config.model_type!r}")
    model = PRUNED_CLASSES[config.model_type]._from_config(config, dtype=torch_dtype)
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
