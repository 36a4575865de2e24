"""The flags and argument types the commands share, and the checks every command makes before its slow load."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import AdaPrunerError


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints the whole usage block by default)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name, hub id, local folder, GGUF file or pruned folder (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_eval_args(p: argparse.ArgumentParser, split_default: str = "test") -> None:
    from ..data import DEFAULT_SEQ_LEN

    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="text source: builtin:books|wiki|news|jargon, hf:NAME[:CONFIG], or a local file/folder; "
                   "repeatable (default: builtin:books)")
    p.add_argument("--split", default=split_default, choices=["pool", "validation", "test"])
    p.add_argument("--seq-len", type=positive(int, "--seq-len"), default=DEFAULT_SEQ_LEN,
                   help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-windows", type=not_negative(int, "--max-windows"), default=64,
                   help="evaluate at most this many windows per source; 0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=positive(int, "--batch-size"), default=None,
                   help="windows per forward pass (default: 1024 tokens)")


def data_specs(args: argparse.Namespace) -> list[str]:
    return args.data or ["builtin:books"]


def batch_size(args: argparse.Namespace) -> int:
    from ..evaluate import default_batch_size

    return args.batch_size or default_batch_size(args.seq_len)


def positive(kind: type, name: str, allow_zero: bool = False) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value < 0 or (value == 0 and not allow_zero) or value != value:
            raise argparse.ArgumentTypeError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {text}")
        return value

    return parse


def not_negative(kind: type, name: str) -> Callable[[str], int | float]:
    return positive(kind, name, allow_zero=True)


def check_before_loading(args: argparse.Namespace) -> None:
    """Everything about the model, device and dtype that can be checked without loading the model."""
    from ..device import resolve_device, resolve_dtype
    from ..models import read_model_config

    if not hasattr(args, "model"):
        return
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    config = read_model_config(str(args.model))
    layers = getattr(args, "layers", None) if getattr(args, "allocation", None) == "layer_range" else None
    if config is not None and layers is not None and "num_hidden_layers" in config:
        from ..plan import Allocation

        n_layers, (first, last) = config["num_hidden_layers"], layers
        try:
            Allocation(first, last).layer_range(n_layers)
        except AdaPrunerError:
            raise AdaPrunerError(f"--layers {first}:{last} does not fit the model's {n_layers} layers "
                                 f"(FIRST:LAST with 0 <= FIRST < LAST <= {n_layers}; a LAST <= 0 counts from the end)"
                                 ) from None


def task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--tasks takes comma-separated task names, e.g. books-cloze,piqa")
    return names


def parse_mixture(text: str) -> dict[str, float]:
    """``taylor_first`` or ``wanda_sp=0.7,magnitude_l2=0.3``."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad metric weight in {part!r}") from None
    return weights


def parse_layers(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        first, last = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes FIRST:LAST, e.g. 4:-2, got {text!r}") from None
    if first < 0 or (last > 0 and first >= last):
        raise argparse.ArgumentTypeError(f"--layers takes FIRST:LAST with 0 <= FIRST < LAST (LAST may be negative, "
                                         f"counting from the end), got {text!r}")
    return first, last


def target_value(text: str) -> float | int:
    """What to remove: a fraction in (0, 1) of all parameters, or a parameter count."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target takes a fraction in (0, 1) or a parameter count, got {text!r}") \
            from None
    from ..plan import check_target

    try:
        return check_target(int(value) if value >= 1 and value.is_integer() else value)
    except AdaPrunerError:
        raise argparse.ArgumentTypeError(f"--target must be in (0, 1) or a parameter count >= 1, got {text}") from None


def target_list(text: str) -> tuple[float | int, ...]:
    """``--target 0.1,0.2,0.3``: one target or several, each a fraction or a parameter count, no repeats."""
    from ..search import check_targets

    targets = tuple(target_value(part.strip()) for part in text.split(","))
    try:
        check_targets(targets)
    except AdaPrunerError as exc:
        raise argparse.ArgumentTypeError(f"--{exc}") from None
    return targets


def add_config_args(p: argparse.ArgumentParser) -> None:
    from ..data import DEFAULT_SEQ_LEN
    from ..plan import DEFAULT_TARGET, LLM_PRUNER_LAYERS, SCOPES
    from ..repair import REPAIR_MODES, REPAIR_WINDOWS, Repair

    p.add_argument("--target", "--ratio", dest="target", type=target_value, default=DEFAULT_TARGET,
                   help="share of ALL parameters to remove, or a parameter count (default: %(default)s)")
    p.add_argument("--aggregation", default="sum", help="sum | mean | max | prod | last (default: %(default)s)")
    p.add_argument("--allocation", default="layer_range",
                   help="uniform | layer_range | adaptive (default: %(default)s)")
    p.add_argument("--layers", type=parse_layers, default=LLM_PRUNER_LAYERS, metavar="FIRST:LAST",
                   help="layer_range: layers FIRST..LAST-1 are pruned (default: {}:{}, as LLM-Pruner)"
                   .format(*LLM_PRUNER_LAYERS))
    p.add_argument("--strength", type=float, default=0.5, help="adaptive allocation strength in [0, 1]")
    p.add_argument("--attn-share", type=float, default=None,
                   help="share of each layer's budget taken from attention groups (default: proportional)")
    p.add_argument("--scope", choices=SCOPES, default="layer",
                   help="layer: a budget per layer, as --allocation spreads it; global: one ranking of every group and "
                   "channel of the pruned layers, FLAP's (use a per-layer standardised metric: flap) "
                   "(default: %(default)s)")
    p.add_argument("--drop-layers", type=not_negative(int, "--drop-layers"), default=0,
                   help="remove this many whole decoder layers, those that change their input least "
                   "(ShortGPT's block influence); the rest of the target comes from width (default: %(default)s)")
    add_channel_multiple_arg(p)
    p.add_argument("--repair", choices=REPAIR_MODES, default=Repair.mode,
                   help="after the cut, put back what the removed o_proj/down_proj columns contributed: their mean as "
                   "a bias (bias, FLAP's), or predicted from the kept columns by ridge regression on the repair "
                   "windows' moments (pool) or layer by layer on the pruned model's own activations (sequential) "
                   "(default: %(default)s)")
    p.add_argument("--ridge", type=positive(float, "--ridge"), default=Repair.ridge,
                   help="the repair's ridge, relative to the kept inputs' mean variance; large: the bias alone "
                   "(default: kept columns per repair token)")
    p.add_argument("--repair-windows", type=positive(int, "--repair-windows"), default=REPAIR_WINDOWS,
                   help="windows of each calibration source the repair's moments come from (default: %(default)s)")
    p.add_argument("--seq-len", type=positive(int, "--seq-len"), default=DEFAULT_SEQ_LEN,
                   help="calibration and evaluation window (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="append", metavar="SOURCE",
                   help="evaluation text source, repeatable (default: the calibration sources)")
    p.add_argument("--max-windows", type=int, default=64,
                   help="evaluate at most this many windows per source and split; 0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: 1024 tokens)")


def add_export_dtype_arg(p: argparse.ArgumentParser) -> None:
    from ..search import EXPORT_DTYPES

    p.add_argument("--export-dtype", choices=EXPORT_DTYPES, default="auto",
                   help="dtype of the saved weights (default: auto, the dtype the model was released in)")


def add_export_format_args(p: argparse.ArgumentParser) -> None:
    from ..search import EXPORT_FORMATS, SearchJob
    from ..to_gguf import GGUF_TYPES

    p.add_argument("--export-format", choices=EXPORT_FORMATS, default=SearchJob.export_format,
                   help="gguf: also write the model as one GGUF file (model.gguf beside the folder) that llama.cpp, "
                   "Ollama and LM Studio run (default: %(default)s)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=SearchJob.gguf_type,
                   help="the GGUF file's weights; q8_0 and q4_k_m by llama.cpp's quantizer (default: %(default)s)")


def add_channel_multiple_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channel-multiple", type=positive(int, "--channel-multiple"), default=None,
                   help="keep each layer's MLP channels in multiples of this, for fast GPU kernels "
                   "(default: 64 on CUDA, 1 on CPU)")


def add_lora_args(p: argparse.ArgumentParser, old_steps_flag: str, steps_default: int | None = None,
                  help_steps: str = "LoRA steps", old_prefix: str | None = None) -> None:
    """LoRA's flags, named alike in every command (``--lora-steps``, ``--lora-r``, ``--lora-lr``, ...);
    each command's older name for the step count (and, with ``old_prefix``, for r and lr) stays as an alias."""
    from ..finetune import LoRA

    old = (lambda name: [f"{old_prefix}-{name}"]) if old_prefix else (lambda name: [])
    p.add_argument("--lora-steps", old_steps_flag, type=not_negative(int, "--lora-steps"),
                   default=LoRA.steps if steps_default is None else steps_default, dest="lora_steps",
                   help=f"{help_steps} (default: %(default)s; {old_steps_flag} is the same)")
    p.add_argument("--lora-r", *old("r"), type=positive(int, "--lora-r"), default=LoRA.r)
    p.add_argument("--lora-alpha", type=positive(int, "--lora-alpha"), default=LoRA.alpha)
    p.add_argument("--lora-dropout", type=float, default=LoRA.dropout)
    p.add_argument("--lora-lr", "--lr", *old("lr"), type=positive(float, "--lora-lr"), default=LoRA.lr, dest="lr")
    p.add_argument("--train-batch-size", type=positive(int, "--train-batch-size"), default=4)
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")


def lora_from(args: argparse.Namespace):
    from ..finetune import LoRA

    return LoRA(steps=args.lora_steps, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, lr=args.lr,
                batch_size=args.train_batch_size, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)


def parse_fixed(text: str) -> tuple[str, object]:
    """``name=value`` for --fix: numbers become numbers, ``none`` becomes None."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--fix takes NAME=VALUE, got {text!r}")
    if value.lower() == "none":
        return name, None
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def parse_heldout(values: list[str] | None) -> tuple[str, ...] | None:
    """``--heldout``: None (not given) means the default; ``none`` means no held-out test."""
    if not values:
        return None
    return () if [v.lower() for v in values] == ["none"] else tuple(values)


def subset_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--subset-size takes MIN:MAX, got {text!r}") from None


def number_range(kind: type, flag: str, low: float, inclusive: bool = True):
    """An argparse type for ``flag``'s ``MIN:MAX`` (one value: both) of ``kind``: ``low <= MIN <= MAX`` (``low <
    MIN`` unless ``inclusive``), finite."""
    bound = f"{low:g} {'<=' if inclusive else '<'} MIN <= MAX"

    def parse(text: str) -> tuple:
        lo, _, hi = text.partition(":")
        try:
            first, last = kind(lo), kind(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes MIN:MAX, got {text!r}") from None
        if not ((first >= low if inclusive else first > low) and first <= last < float("inf")):
            raise argparse.ArgumentTypeError(f"{flag} takes MIN:MAX with {bound}, got {text!r}")
        return first, last

    return parse


iterations_range = number_range(int, "--iterations", 1)
ridge_range = number_range(float, "--ridge", 0, inclusive=False)
