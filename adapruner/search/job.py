"""A search job: everything that defines a search, stored with its study so a resume can check it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..data import DEFAULT_CALIBRATION, DEFAULT_SEQ_LEN, check_heldout
from ..errors import AdaPrunerError
from ..finetune import LoRA
from ..models import DEFAULT_MODEL
from ..plan import DEFAULT_TARGET, check_target
from ..repair import REPAIR_WINDOWS
from ..to_gguf import GGUF_TYPES
from .baselines import BASELINES, DEFAULT_BASELINES, draws
from .samplers import PRUNERS, SAMPLERS
from .space import SearchSpace

AFTER_THE_SEARCH = ("trials", "tasks", "task_limit", "export_dtype", "measure_cost", "cost_rounds", "export_format",
                    "gguf_type")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
# The best model as a transformers folder (always), and also as one GGUF file llama.cpp runs (adapruner.to_gguf).
EXPORT_FORMATS = ("safetensors", "gguf")
# How the first searched trials are chosen: by TPE's random start-up alone; from LLM-Pruner's and FLAP's own
# configurations and the priors shipped with the package; and also from earlier studies in the same storage.
STARTS = ("random", "informed", "warm")
# Fields stored by earlier versions under another name (studies keep their job), read under the one name now.
LEGACY_FIELDS = {"ratio": "target", "recover": "finetune"}


@dataclass(frozen=True)
class SearchJob:
    """Everything that defines a search; stored with the study so a resume can check it matches."""

    model: str = DEFAULT_MODEL
    calibration: tuple[str, ...] = DEFAULT_CALIBRATION  # two kinds of text: see DEFAULT_CALIBRATION
    evaluation: tuple[str, ...] = ()  # default: the calibration sources
    heldout: tuple[str, ...] | None = None  # test only; None: the built-in sources not used above
    target: float | int = DEFAULT_TARGET  # what to remove: a share of all parameters, or a parameter count
    trials: int = 30  # searched trials (finished: complete or stopped early); the baselines run besides them
    sampler: str = "tpe"
    pruner: str = "wilcoxon"
    seed: int = 0
    pool_size: int = 64
    seq_len: int = DEFAULT_SEQ_LEN
    val_windows: int = 32  # per evaluation source
    test_windows: int = 64
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    baseline_draws: int = 3  # draws of each baseline that samples its calibration at random (llm-pruner)
    space: SearchSpace = field(default_factory=SearchSpace)
    start: str = "warm"  # see STARTS
    repair_windows: int = REPAIR_WINDOWS  # windows of each calibration source's pool part for the repair's moments
    finalists: int = 4  # the best trials by validation (baselines included) re-scored on more validation windows
    selection_windows: int = 96  # validation windows per source added for that re-scoring
    channel_multiple: int | None = None  # kept MLP channels per layer in multiples of this; None: 64 on CUDA, else 1
    # The least decode speed-up (tokens/s over the unpruned model's) the chosen model must be predicted to reach in
    # llama.cpp (torch without it); None: no floor. See adapruner.search.speed.
    min_speedup: float | None = None
    finetune: LoRA | None = None  # LoRA fine-tuning of the best configuration after the search
    # lm-eval tasks scored after the search (unpruned, baselines, best); measured, never searched on.
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None  # items per task; None: all
    measure_cost: bool = True  # measure decode/prefill speed and memory of the unpruned, baselines and best
    cost_rounds: int = 5  # interleaved rounds of that measurement: each model measured once per round
    export_dtype: str = "auto"  # the best model's weights on disk; auto: the dtype the model was released in
    export_format: str = "safetensors"  # see EXPORT_FORMATS
    gguf_type: str = "f16"  # the GGUF file's weights (export_format gguf): see adapruner.to_gguf.GGUF_TYPES

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.trials < 1:
            raise AdaPrunerError(f"trials must be at least 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise AdaPrunerError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.pruner not in PRUNERS:
            raise AdaPrunerError(f"unknown pruner {self.pruner!r} (choose from {', '.join(PRUNERS)})")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise AdaPrunerError(f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})")
        if self.start not in STARTS:
            raise AdaPrunerError(f"unknown start {self.start!r} (choose from {', '.join(STARTS)})")
        for name in ("pool_size", "seq_len", "val_windows", "test_windows", "baseline_draws", "repair_windows",
                     "finalists", "cost_rounds"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise AdaPrunerError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.calibration:
            raise AdaPrunerError("a search needs at least one calibration source")
        if self.heldout is not None:
            check_heldout([*self.calibration, *self.evaluation], self.heldout)
        if self.channel_multiple is not None and (isinstance(self.channel_multiple, bool)
                                                  or not isinstance(self.channel_multiple, int)
                                                  or self.channel_multiple < 1):
            raise AdaPrunerError(f"channel_multiple must be a whole number >= 1, got {self.channel_multiple!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise AdaPrunerError(f"unknown export_dtype {self.export_dtype!r} (choose from {', '.join(EXPORT_DTYPES)})")
        if self.export_format not in EXPORT_FORMATS:
            raise AdaPrunerError(f"unknown export_format {self.export_format!r} "
                                 f"(choose from {', '.join(EXPORT_FORMATS)})")
        if self.gguf_type not in GGUF_TYPES:
            raise AdaPrunerError(f"unknown gguf_type {self.gguf_type!r} (choose from {', '.join(GGUF_TYPES)})")
        if self.selection_windows < 0:
            raise AdaPrunerError(f"selection_windows must be >= 0, got {self.selection_windows}")
        if self.min_speedup is not None and (isinstance(self.min_speedup, bool)
                                             or not isinstance(self.min_speedup, int | float)
                                             or not 1.0 < self.min_speedup < 100.0):
            raise AdaPrunerError(f"min_speedup must be a number above 1 (the unpruned model decodes at 1), "
                                 f"got {self.min_speedup!r}")
        if self.task_limit is not None and self.task_limit < 1:
            raise AdaPrunerError(f"task_limit must be positive, got {self.task_limit}")

    @property
    def regresses(self) -> bool:
        """Whether a trial or baseline may take the ``pool`` repair (its space, the ``llm-pruner+repair`` baseline,
        the informed start's repaired peers): then the ``bias`` repair reads its means from the same moments,
        measured once, rather than from a pass of their own."""
        modes = {self.space.fixed["repair"]} if "repair" in self.space.fixed else set(self.space.repairs)
        return "pool" in modes or "llm-pruner+repair" in self.baselines or self.start != "random"

    @property
    def baseline_runs(self) -> tuple[tuple[str, int], ...]:
        """``(baseline, draw)`` of every baseline trial of the study."""
        return tuple((name, d) for name in self.baselines for d in draws(name, self.baseline_draws))

    @property
    def total_trials(self) -> int:
        """Trials the study finishes: the searched ``trials`` and one per baseline run."""
        return self.trials + len(self.baseline_runs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["space"] = self.space.to_dict()
        return data

    def identity(self) -> dict:
        """What must match to resume a study: everything but the budget, which may grow, and the tasks
        measured after the search, which the search never sees."""
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k not in AFTER_THE_SEARCH}

    @classmethod
    def from_dict(cls, data: dict) -> SearchJob:
        data = {LEGACY_FIELDS.get(k, k): v for k, v in data.items()}
        data["space"] = SearchSpace.from_dict(data.get("space", {}))
        if data.get("finetune") is not None:
            lora = dict(data["finetune"])
            lora["targets"] = tuple(lora.get("targets", LoRA.targets))
            data["finetune"] = LoRA(**lora)
        for key in ("calibration", "evaluation", "baselines", "heldout", "tasks"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def default_study_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model.replace('/', '_')}-r{self.target:g}-{digest}"
