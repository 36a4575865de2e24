"""A GGUF file to a plain safetensors checkpoint, one tensor at a time.

``from_pretrained(gguf_file=...)`` de-quantises every tensor of the file into one dictionary before it
builds the model, so converting through it holds the whole fp32 model about twice (1.8x its size,
measured on the built-in model). Here each tensor is de-quantised, given transformers' own GGUF
fix-ups (its tensor processor: Llama's q/k permutation reversed) and name map, and written into a
safetensors shard of at most ``shard_bytes``; a full shard is written and freed before the next one
fills. A tensor is de-quantised a block of rows at a time into its fp32 array, and the GGUF file is
memory-mapped, so the conversion holds the file's metadata (the tokenizer's vocabulary), one shard
and the largest tensor, whatever the model's size (``bench/gguf_memory.py``, docs/results.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .cache import atomic_folder
from .errors import AdaPrunerError
from .structure import check_supported
from .to_gguf import GGUF_TOKENIZER, source_tokenizer_settings

logger = logging.getLogger(__name__)

SHARD_BYTES = 256 * 2**20
CHUNK_BYTES = 16 * 2**20  # of fp32 rows de-quantised at a time: de-quantising makes temporaries of several x this


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (the first key-value pairs) without
    mapping the tensors: a moment, whatever the file's size. The types are gguf's own (:class:`GGUFValueType`)."""
    import struct

    from gguf import GGUFValueType

    scalar = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
              GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
              GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}

    def read(f, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise AdaPrunerError(f"{path} ends inside its GGUF header")
        return struct.unpack("<" + fmt, data)[0]

    def skip(f, kind: int) -> None:
        if kind == GGUFValueType.STRING:
            f.seek(read(f, "Q"), 1)
        elif kind == GGUFValueType.ARRAY:
            item, count = read(f, "I"), read(f, "Q")
            if item in scalar:
                f.seek(struct.calcsize("<" + scalar[item]) * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        elif kind in scalar:
            read(f, scalar[kind])
        else:
            raise AdaPrunerError(f"{path} has a GGUF value of unknown type {kind}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise AdaPrunerError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        version, _, n_kv = read(f, "I"), read(f, "Q"), read(f, "Q")
        if version < 2:
            raise AdaPrunerError(f"{path} is GGUF version {version}; version 2 or later is needed")
        for _ in range(n_kv):
            key = f.read(read(f, "Q")).decode("utf-8", "replace")
            kind = read(f, "I")
            if key == "general.architecture" and kind == GGUFValueType.STRING:
                return f.read(read(f, "Q")).decode("utf-8", "replace")
            skip(f, kind)
    raise AdaPrunerError(f"{path} names no general.architecture in its GGUF header")


class _ShardWriter:
    """Tensors written into safetensors shards of at most ``shard_bytes`` (one tensor may exceed it), and
    the index transformers reads to load a sharded checkpoint."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.folder / f"shard-{len(self.shards)}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards as transformers does, write the index; the tensors' names."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / "shard-0.safetensors").rename(self.folder / "model.safetensors")
            return self.shards[0]
        weight_map = {}
        for i, names in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i}.safetensors").rename(self.folder / file)
            weight_map |= dict.fromkeys(names, file)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(weight_map)


def _dequantize_rows(tensor, dequantize) -> np.ndarray:
    """A GGUF tensor de-quantised to fp32 a block of rows at a time, so that its temporaries stay small."""
    data = tensor.data
    if data.ndim < 2:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    rows = max(1, CHUNK_BYTES // max(1, out[0].nbytes))
    for start in range(0, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], tensor.tensor_type)
    return out


def convert_gguf(gguf_file: Path, out_dir: Path, shard_bytes: int = SHARD_BYTES, progress: bool = True) -> None:
    """De-quantise ``gguf_file`` into ``out_dir``: an fp32 safetensors checkpoint with its config, generation
    config and tokenizer, written beside ``out_dir`` and renamed onto it when complete."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF support needs it)
        from gguf import GGUFReader, dequantize
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )
    except ImportError as exc:
        raise AdaPrunerError(f"loading GGUF files needs the packages gguf and accelerate: {exc}") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    logger.info("converting %s to safetensors (once)", gguf_file)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    check_supported(config)
    config = type(config).from_dict(
        {k: v for k, v in config.to_dict().items() if k not in ("quantization_config", "_name_or_path")})
    with torch.device("meta"):  # names and shapes only: no storage
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=False)  # metadata: config and tokenizer
    reader = GGUFReader(gguf_file)  # memory-mapped
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=parsed["config"])
    hf_names = get_gguf_hf_weights_map(skeleton, processor)
    with atomic_folder(out_dir) as partial:
        writer = _ShardWriter(partial, shard_bytes)
        for tensor in tqdm(reader.tensors, desc="de-quantising GGUF tensors", unit="tensor", disable=not progress,
                           leave=False):
            result = processor.process(weights=_dequantize_rows(tensor, dequantize), name=tensor.name,
                                       tensor_key_mapping=hf_names, parsed_parameters=parsed)
            if result.name in hf_names:  # what the model has no place for is skipped, as transformers does
                # owned, writable fp32 (a float32 tensor of the file comes as a read-only view of the mapping)
                writer.add(hf_names[result.name], torch.from_numpy(np.require(result.weights, np.float32, "CWO")))
        written = set(writer.close())
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = sorted(set(skeleton.state_dict()) - written - tied)
        if missing:
            raise AdaPrunerError(f"{gguf_file.name} has no tensor for {missing[0]} (and {len(missing) - 1} more)")
        skeleton.config.save_pretrained(partial)
        skeleton.generation_config.save_pretrained(partial)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(partial)
        (partial / GGUF_TOKENIZER).write_text(json.dumps(source_tokenizer_settings(reader), indent=1) + "\n")
