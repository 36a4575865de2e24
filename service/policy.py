"""What a submitted job may touch: models and texts are checked against the operator's settings.

Nothing outside the configured roots is ever read on a user's say-so: a local path must resolve
(symlinks followed, ``..`` collapsed) inside ``models_root`` / ``texts_root``; hub models must be on
the allow-list; remote code runs only if the operator allows it.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapruner.data import BUILTIN_TEXTS, parse_draw, pool_draws
from adapruner.errors import AdaPrunerError
from adapruner.models import BUILTIN_MODELS, prunable_params_of, read_model_config
from adapruner.search import check_fixed
from adapruner.tasks import BUILTIN_TASKS, check_tasks
from adapruner.to_gguf import check_gguf_config, check_quant

from .schemas import JobCreate
from .settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PolicyError(Exception):
    """The request is well-formed but not allowed here (HTTP 403)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class InvalidField(Exception):
    """A field's value is not valid (HTTP 422, naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def inside(root: Path | None, value: str, field: str, what: str) -> Path:
    """``value`` as a path inside ``root`` (relative values are taken relative to it)."""
    if root is None:
        raise PolicyError(field, f"local {what} are not allowed on this server (no {what} root configured)")
    if value.startswith("~"):
        raise PolicyError(field, f"{value!r} is outside the allowed {what} folder")
    base = root.resolve()
    candidate = Path(value) if Path(value).is_absolute() else base / value
    try:  # a name too long for the file system, a symlink loop: the user's path, not the server, is at fault
        resolved = candidate.resolve()
        if not resolved.is_relative_to(base):
            raise PolicyError(field, f"{value!r} is outside the allowed {what} folder")
        exists = resolved.exists()
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a symlink loop"
        raise InvalidField(field, f"{value[:100]!r} cannot be a path in the {what} folder ({reason})") from None
    if not exists:
        raise InvalidField(field, f"{value!r} does not exist in the {what} folder")
    return resolved


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a path the file system cannot even look up (too long, a loop) does not."""
    try:
        return path.exists()
    except (OSError, RuntimeError):
        return False


def check_model(model: str, settings: Settings) -> str:
    """The model reference a worker should load (a resolved path for local folders)."""
    root = settings.models_root
    local = root is not None and not model.startswith("~") and _exists(root / model)
    if model in BUILTIN_MODELS:
        return model
    if HUB_ID.match(model) and not local:
        if any(model == a or (a.endswith("/*") and model.startswith(a[:-1])) for a in settings.allowed_hub_models):
            return model
        raise PolicyError("model", f"model {model!r} is not on this server's allow-list")
    if local or "/" in model or model.startswith((".", "~")) or model.endswith(".gguf"):
        path = inside(root, model, "model", "models")
        try:  # a folder or file that is not a model would be accepted here only to fail in the worker
            read_model_config(str(path))
        except AdaPrunerError as exc:
            raise InvalidField("model", str(exc).replace(str(root.resolve()), "<models root>")) from None
        return str(path)
    raise InvalidField("model", f"unknown model {model!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), "
                                "an allowed hub id, or a folder below the models root")


def check_text(spec: str, settings: Settings, field: str) -> str:
    """A text source (optionally with a ``:N`` sample count), local paths resolved inside the texts root."""
    source, count = parse_draw(spec, 0)
    suffix = f":{count}" if count else ""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_TEXTS:
            raise InvalidField(field, f"unknown built-in text {name!r} (choose from {', '.join(BUILTIN_TEXTS)})")
        return spec
    if source.startswith("hf:"):
        target = source[3:].split("?", 1)[0].split(":", 1)[0]
        if target.startswith(("/", ".", "~")):
            return f"hf:{inside(settings.texts_root, target, field, 'texts')}{source[3 + len(target):]}{suffix}"
        # `datasets` would read a name that happens to exist as a local folder from disk.
        if not (HUB_ID.match(target) or HUB_NAME.match(target)):
            raise InvalidField(field, f"{target!r} is not a dataset id (NAME or OWNER/NAME)")
        if not settings.allow_hub_datasets:
            raise PolicyError(field, "Hugging Face hub datasets are not allowed on this server")
        return spec
    return f"{inside(settings.texts_root, source, field, 'texts')}{suffix}"


def check_against_model(spec: JobCreate, model: str) -> None:
    """What only the model decides, checked at submission where its config is on disk (a built-in model once
    fetched, a folder): fixed layer ranges and depth within its layers, parameter counts within its prunable
    parameters. A job that would only fail in the worker is refused here."""
    try:
        config = read_model_config(model)
    except AdaPrunerError:
        return  # check_model has said what is wrong with the model itself
    if not config or "num_hidden_layers" not in config:
        return
    if spec.export_format == "gguf":
        try:
            check_gguf_config(config, model)
        except AdaPrunerError as exc:
            raise InvalidField("export_format", str(exc)) from None
    try:
        spec.to_search_job().space.check_layers(config["num_hidden_layers"])
    except AdaPrunerError as exc:
        raise InvalidField("space.fixed", str(exc)) from None
    counts = [t for t in spec.targets if isinstance(t, int)]
    prunable = prunable_params_of(config) if counts else None
    if prunable is not None and max(counts) > prunable:
        raise InvalidField("target", f"cannot remove {max(counts)} parameters: the model has {prunable} prunable "
                                    f"parameters")


def check_spec(spec: JobCreate, settings: Settings) -> JobCreate:
    """Check a job against the policy and limits; returns it with local paths resolved."""
    if spec.trust_remote_code and not settings.allow_trust_remote_code:
        raise PolicyError("trust_remote_code", "this server does not run model code from the hub")
    limits = {"trials": settings.max_trials, "pool_size": settings.max_pool_size,
              "val_windows": settings.max_eval_windows, "test_windows": settings.max_eval_windows}
    for name, limit in limits.items():
        if getattr(spec, name) > limit:
            raise InvalidField(name, f"{name} must be at most {limit} on this server, got {getattr(spec, name)}")
    if spec.finetune is not None and spec.finetune.steps > settings.max_finetune_steps:
        raise InvalidField("finetune.steps", f"finetune.steps must be at most {settings.max_finetune_steps} on this "
                                             f"server, got {spec.finetune.steps}")
    try:  # counts in the calibration specs (builtin:books:5000) decide the pool as much as pool_size does
        pool = sum(n for _, n in pool_draws(spec.calibration, spec.pool_size))
    except AdaPrunerError as exc:
        raise InvalidField("calibration", str(exc)) from None
    if pool > settings.max_pool_size:
        raise InvalidField("calibration", f"the calibration pool would hold {pool} windows; at most "
                                          f"{settings.max_pool_size} on this server")
    lo, hi = spec.space.subset_size
    if not 1 <= lo <= hi:
        raise InvalidField("space.subset_size", f"subset_size must satisfy 1 <= min <= max, got {[lo, hi]}")
    for name, value in spec.space.fixed.items():
        try:
            check_fixed(name, value, spec.space.n_clusters)
        except AdaPrunerError as exc:
            raise InvalidField(f"space.fixed.{name}", str(exc)) from None
    others = [t for t in spec.tasks if t not in BUILTIN_TASKS]
    if others and not settings.allow_hub_datasets:  # refused before lm-eval's registry is read (seconds)
        raise InvalidField("tasks", f"only the built-in tasks ({', '.join(BUILTIN_TASKS)}) run on this server, "
                                    f"not {', '.join(others)}: hub tasks fetch their data from the hub")
    try:
        check_tasks(spec.tasks)
    except AdaPrunerError as exc:
        raise InvalidField("tasks", str(exc)) from None
    if spec.export_format == "gguf":
        try:  # a quantized file needs llama.cpp's quantizer where the job runs
            check_quant(spec.gguf_type)
        except AdaPrunerError as exc:
            raise InvalidField("gguf_type", str(exc)) from None
    model = check_model(spec.model, settings)
    check_against_model(spec, model)
    for field in ("evaluation", "heldout"):  # windows to score, not samples to draw: a count means nothing there
        counted = [s for s in getattr(spec, field) or [] if parse_draw(s, 0)[1]]
        if counted:
            raise InvalidField(field, f"{field} sources take no sample count (:N), got {counted[0]!r}; "
                                      "only calibration sources do")
    return spec.model_copy(update={
        "model": model,
        "calibration": [check_text(s, settings, "calibration") for s in spec.calibration],
        "evaluation": [check_text(s, settings, "evaluation") for s in spec.evaluation],
        "heldout": None if spec.heldout is None else [check_text(s, settings, "heldout") for s in spec.heldout],
    })
