"""A saved model (pruned or not) as one GGUF file that stock llama.cpp runs, and through it Ollama and LM Studio.

**Layout.** A model whose layers all kept the same sizes is written as its own architecture (``llama`` for
Llama and Mistral, ``qwen2``), as llama.cpp's converter writes it. A model whose layers differ is written as
``deci``, the architecture llama.cpp uses for NVIDIA's Nemotron-NAS models: it reads the attention head count,
the KV head count and the feed-forward width *per layer* from GGUF arrays and builds each layer's tensors from
its own values (``src/models/deci.cpp``; verified against the llama.cpp vendored by llama-cpp-python 0.3.36,
llama.cpp commit 0c1e570). ``deci`` also takes an o_proj and a down_proj bias (a repair's) and q/k/v biases
(Qwen2's). Dropped layers are simply absent: the pruned stack is written as it is.

**Rotary layout.** ``deci`` and ``llama`` apply rotary embeddings to interleaved pairs, transformers to two
halves; the q and k rows (and their biases) are permuted per head, as llama.cpp's converter does for Llama.
Qwen2 written as ``qwen2`` keeps its halves (llama.cpp rotates it as NeoX).

**Types.** ``f32``, ``f16`` and ``bf16`` are written here (norms and biases stay f32, as llama.cpp's converter
keeps them); ``q8_0`` and ``q4_k_m`` go through llama.cpp's own quantizer (``llama_model_quantize`` of
llama-cpp-python) from an f16 file. A projection whose width the quantized blocks do not divide (a pruned
down_proj's input, say) gets llama.cpp's own fallback type.

**Tokenizer.** The vocabulary, merges, special tokens and chat template come from the folder's tokenizer
(byte-level BPE, as every built-in model has). The pre-tokenizer that llama.cpp applies before BPE is named in
the GGUF: when the model was converted from a GGUF, the source file's own name is kept (``gguf_tokenizer.json``,
written at conversion and carried into every export); otherwise it is recognised from ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from .errors import AdaPrunerError
from .quiet import output_to

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
QUANTIZED = ("q8_0", "q4_k_m")  # written by llama.cpp's quantizer
# general.file_type of each type (llama.cpp's llama_ftype, gguf's LlamaFileType): written, quantized to, read back
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}
QUANT_BLOCK = 32  # the row width llama.cpp's q8_0/q5_0 blocks need (q4_K's 256 falls back to them)
GGUF_TOKENIZER = "gguf_tokenizer.json"  # the source GGUF's tokenizer settings, kept beside a converted model
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers' -> llama.cpp's (uniform)
ROPE_TYPES = ("default", "linear")
LAYER_TENSORS = {  # transformers' name inside model.layers.N -> llama.cpp's inside blk.N
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# a tokenizer.json pre-tokenizer's regular expression -> llama.cpp's pre-tokenizer name
PRE_TOKENIZERS = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


@dataclass(frozen=True)
class GGUFLayout:
    """What a folder becomes in llama.cpp: its architecture there and each layer's sizes."""

    arch: str  # llama.cpp's: llama, qwen2 or deci
    model_type: str  # transformers'
    heads: tuple[int, ...]  # attention heads per layer
    kv_heads: tuple[int, ...]
    ff: tuple[int, ...]  # MLP channels per layer
    head_dim: int
    output_bias: bool

    @property
    def permute_rotary(self) -> bool:
        """Whether q/k rows go from transformers' halves to llama.cpp's interleaved pairs."""
        return self.arch in ("llama", "deci")

    def padded(self, multiple: int) -> GGUFLayout:
        """Each layer's MLP width rounded up to ``multiple``: zero channels added (gate and up rows of zeros, down
        columns of zeros) change nothing, since silu(0) * 0 = 0, and let llama.cpp's quantizer, whose blocks are
        32 wide, quantize a cut down_proj it would otherwise leave in f16."""
        return replace(self, ff=tuple(-(-f // multiple) * multiple for f in self.ff))


def check_quant(quant: str) -> str:
    """``quant`` if it is a type this export writes; the error names the choices."""
    if quant not in GGUF_TYPES:
        raise AdaPrunerError(f"unknown GGUF type {quant!r} (choose from {', '.join(GGUF_TYPES)})")
    if quant in QUANTIZED:
        llama_cpp_module()
    return quant


def llama_cpp_module():
    """llama-cpp-python's module, or an error that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise AdaPrunerError("this needs llama.cpp's Python binding: pip install 'adapruner[llama-cpp]' "
                             "(llama-cpp-python, built from source with cmake and a C compiler)") from None
    return llama_cpp


def read_layout(folder: str | Path) -> GGUFLayout:
    """The GGUF layout of a saved model folder, from its ``config.json`` alone: every reason llama.cpp could not
    take it is raised here, before any weight is read."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise AdaPrunerError(f"{folder} is not a saved model (no config.json); export a folder written by "
                             "`adapruner prune --out` or `search --out`, or a transformers checkpoint")
    if not any(folder.glob("*.safetensors")):
        raise AdaPrunerError(f"{folder} has no safetensors weights")
    if not (folder / "tokenizer.json").is_file():
        raise AdaPrunerError(f"{folder} has no tokenizer.json: a GGUF file carries its tokenizer")
    config = json.loads(path.read_text())
    check_gguf_config(config, str(folder))
    model_type = config["model_type"]
    n_rep = config["num_attention_heads"] // config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    recorded = config.get("adapruner") or {}
    sizes = recorded.get("layers") or [{"num_key_value_heads": config["num_key_value_heads"],
                                        "intermediate_size": config["intermediate_size"]}] * config["num_hidden_layers"]
    kv = tuple(s["num_key_value_heads"] for s in sizes)
    ff = tuple(s["intermediate_size"] for s in sizes)
    output_bias = bool(recorded.get("output_bias"))
    uniform = len(set(kv)) == 1 and len(set(ff)) == 1
    # llama.cpp's qwen2 has no o_proj/down_proj bias: a repaired Qwen2 goes through deci as well
    arch = ARCHITECTURES[model_type] if uniform and not (output_bias and model_type == "qwen2") else "deci"
    return GGUFLayout(arch, model_type, tuple(k * n_rep for k in kv), kv, ff, head_dim, output_bias)


def check_gguf_config(config: dict, where: str) -> None:
    """Refuse, from a ``config.json``'s contents, a model this export cannot write for llama.cpp."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise AdaPrunerError(f"{where}: GGUF export takes Llama, Mistral and Qwen2 models, not {model_type!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise AdaPrunerError(f"{where}: rotary scaling {rope_type!r} is not written to GGUF here "
                             f"(only {', '.join(ROPE_TYPES)})")
    if config.get("mlp_bias"):
        raise AdaPrunerError(f"{where}: MLP biases on gate/up are not written to GGUF here")


def permute_rotary(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (weight or bias) from transformers' rotary halves to llama.cpp's interleaved pairs, per head."""
    return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass(frozen=True)
class _Entry:
    """One weight of the folder as the GGUF file holds it: its name there, and where it is read from."""

    name: str  # llama.cpp's
    source: str  # transformers'
    shard: Path
    shape: tuple[int, ...]


def _entries(folder: Path, layout: GGUFLayout, tied: bool) -> list[_Entry]:
    """Every weight of the folder's safetensors shards, from their headers alone (no tensor is read), at its shape
    in the file (an MLP width padded as ``layout`` says)."""
    from safetensors import safe_open

    entries = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                gguf_name = _gguf_name(name, layout, tied)
                if gguf_name is not None:
                    shape = list(f.get_slice(name).get_shape())
                    axis = _mlp_axis(gguf_name)
                    if axis is not None:
                        shape[axis] = layout.ff[int(gguf_name.split(".")[1])]
                    entries.append(_Entry(gguf_name, name, shard, tuple(shape)))
    return entries


def _mlp_axis(gguf_name: str) -> int | None:
    """The axis of a tensor that runs over the layer's MLP channels (transformers' layout), if any."""
    if ".ffn_gate." in gguf_name or ".ffn_up." in gguf_name:
        return 0  # rows (and the bias, were there one)
    if gguf_name.endswith(".ffn_down.weight"):
        return 1
    return None


def _tensors(entries: list[_Entry], layout: GGUFLayout) -> Iterator[tuple[_Entry, torch.Tensor]]:
    """Each entry's tensor, read one at a time (q/k rows permuted for llama.cpp's rotary layout)."""
    from safetensors import safe_open

    for shard, group in groupby(entries, key=lambda e: e.shard):  # entries come shard by shard
        with safe_open(str(shard), framework="pt") as f:  # one shard mapped at a time
            for entry in group:
                t = f.get_tensor(entry.source).clone()  # its own memory, not the mapping's
                axis = _mlp_axis(entry.name)
                if axis is not None and t.shape[axis] < entry.shape[axis]:  # zero channels (GGUFLayout.padded)
                    pad = list(t.shape)
                    pad[axis] = entry.shape[axis] - t.shape[axis]
                    t = torch.cat([t, t.new_zeros(pad)], dim=axis)
                if layout.permute_rotary and (".attn_q." in entry.name or ".attn_k." in entry.name):
                    i = int(entry.name.split(".")[1])
                    t = permute_rotary(t, (layout.heads if ".attn_q." in entry.name else layout.kv_heads)[i])
                yield entry, t


def _gguf_name(name: str, layout: GGUFLayout, tied: bool) -> str | None:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": None if tied else "output.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in LAYER_TENSORS and kind in ("weight", "bias"):
            return f"blk.{parts[2]}.{LAYER_TENSORS[module]}.{kind}"
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some checkpoints carry: llama.cpp computes it
        return None
    raise AdaPrunerError(f"GGUF export has no place for the tensor {name!r} ({layout.model_type})")


def write_gguf(folder: str | Path, out: str | Path, quant: str = "f16", progress: bool = True,
               ff_multiple: int | None = None) -> Path:
    """Write the model saved in ``folder`` as the GGUF file ``out``, its weights as ``quant``
    (:data:`GGUF_TYPES`); returns ``out``. Written beside ``out`` and renamed onto it when complete. Each layer's MLP
    width is padded with zero channels to a multiple of ``ff_multiple`` (default: :data:`QUANT_BLOCK` for the
    quantized types, so that llama.cpp quantizes every projection; 1, none, for the others)."""
    folder, out = Path(folder), Path(out)
    layout = read_layout(folder)
    check_quant(quant)
    layout = layout.padded(ff_multiple or (QUANT_BLOCK if quant in QUANTIZED else 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    if quant in QUANTIZED:
        floating = out.with_name(out.name + ".f16.part")
        try:
            _write_float(folder, layout, floating, "f16", progress)
            quantize(floating, partial, quant)
        finally:
            floating.unlink(missing_ok=True)
    else:
        _write_float(folder, layout, partial, quant, progress)
    partial.replace(out)
    return out


def quantize(source: Path, out: Path, quant: str) -> None:
    """llama.cpp's own quantizer: ``source`` (a GGUF file) to ``out`` as ``quant``."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quant]
    params.nthread = 0  # llama.cpp's choice: the machine's threads
    log = out.with_name(out.name + ".log")  # its table of tensors and fallbacks: shown only when it fails
    try:
        with output_to(log):
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0
        if failed:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise AdaPrunerError(f"llama.cpp could not quantize {source.name} to {quant}"
                                 + (f": {lines[-1]}" if lines else ""))
    finally:
        log.unlink(missing_ok=True)


def _write_float(folder: Path, layout: GGUFLayout, out: Path, quant: str, progress: bool) -> None:
    """Write the file in two passes over the shards: every tensor's name, shape and type from their headers, then
    the tensors one at a time, one shard mapped at a time, so that writing holds about the largest tensor twice,
    not the model (qwen2.5-coder-1.5b, 6.7 GB in fp32: 3.2 GB peak resident for its f16 file, 7.4 GB with every
    shard kept mapped)."""
    import gguf
    from tqdm.auto import tqdm

    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), layout.arch)
    _add_metadata(writer, config, layout, quant)
    _add_tokenizer(writer, folder, config["vocab_size"])
    entries = _entries(folder, layout, bool(config.get("tie_word_embeddings")))
    for entry in entries:
        kind = np.dtype(np.float32 if len(entry.shape) == 1 or quant == "f32" else
                        np.float16 if quant == "f16" else np.uint16)  # bf16: its bits, as gguf's quantize gives them
        writer.add_tensor_info(entry.name, entry.shape, kind, int(np.prod(entry.shape)) * kind.itemsize,
                               raw_dtype=gguf.GGMLQuantizationType.BF16 if kind == np.uint16 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry, tensor in tqdm(_tensors(entries, layout), total=len(entries), desc=f"writing {out.name}",
                              unit="tensor", disable=not progress, leave=False):
        data = tensor.float().numpy()
        if len(entry.shape) == 1 or quant == "f32":  # norms and biases stay f32
            writer.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32))
        elif quant == "f16":
            writer.write_tensor_data(data.astype(np.float16))
        else:
            writer.write_tensor_data(gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16))
    writer.close()


def _add_metadata(writer, config: dict, layout: GGUFLayout, quant: str) -> None:
    import gguf

    base = (config.get("adapruner") or {}).get("base_model") or config.get("_name_or_path") or "model"
    writer.add_name(f"{Path(str(base)).name}, pruned by AdaPruner" if config.get("adapruner") else str(base))
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_block_count(len(layout.ff))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    per_layer = layout.arch == "deci"
    writer.add_feed_forward_length(list(layout.ff) if per_layer else layout.ff[0])
    writer.add_head_count(list(layout.heads) if per_layer else layout.heads[0])
    writer.add_head_count_kv(list(layout.kv_heads) if per_layer else layout.kv_heads[0])
    writer.add_key_length(layout.head_dim)  # not hidden / heads once heads are removed
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])


def _add_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(tokenizer):
        raise AdaPrunerError(f"{folder}: GGUF export takes byte-level BPE tokenizers (GPT-2's kind), "
                             f"not {model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added.get(token, {}).get("special")
                         else gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    settings = _source_settings(folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(settings.get("tokenizer.ggml.pre") or pre_tokenizer(tokenizer, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if "tokenizer.ggml.add_bos_token" in settings:
        special.add_special_token["bos"] = bool(settings["tokenizer.ggml.add_bos_token"])
    special.add_to_gguf(writer, quiet=True)


def _byte_level(tokenizer: dict) -> bool:
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps)


def pre_tokenizer(tokenizer: dict, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer.json`` (its splitting before BPE)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise AdaPrunerError(f"{folder}: its tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one "
                         "llama.cpp names here (GPT-2's, SmolLM's, Qwen2's, Llama 3's)")


def _source_settings(folder: Path) -> dict:
    path = folder / GGUF_TOKENIZER
    return json.loads(path.read_text()) if path.is_file() else {}


def source_tokenizer_settings(reader) -> dict:
    """The scalar tokenizer settings of a GGUF file (a ``gguf.GGUFReader``) that transformers' conversion drops:
    the pre-tokenizer's name and whether a BOS token is added."""
    settings = {}
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"):
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            settings[key] = value.item() if hasattr(value, "item") else value  # numpy scalars to JSON's
    return settings
