"""Request and response bodies of the HTTP API (pydantic), separate from the table in ``db.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from adapruner.errors import AdaPrunerError
from adapruner.finetune import LoRA
from adapruner.importance import AGGREGATIONS, METRICS
from adapruner.plan import SCOPES
from adapruner.repair import REPAIR_MODES
from adapruner.search import (
    BASELINES,
    DEFAULT_BASELINES,
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    PRUNERS,
    SAMPLERS,
    SCORES,
    STARTS,
    SUBSET_MODES,
    SearchJob,
    SearchSpace,
    check_targets,
)
from adapruner.to_gguf import GGUF_TYPES

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # no slashes, no leading dot: safe as a file name
MODEL_FORMATS = ("tar", "gguf")  # what GET /v1/jobs/{id}/model gives: the folder as a tar archive, or a GGUF file
# The pruning target: a share of all parameters, or a whole parameter count (checked against the model
# when the plan is made), as the library's ``params_to_remove`` takes it. A JSON 1.0 is a share (refused).
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]  # "0.2" is no number
# A model or text reference: no control characters (a NUL byte would reach the file system).
Reference = Annotated[str, Field(min_length=1, max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*$")]
TaskName = Annotated[str, Field(min_length=1, max_length=64, pattern=SAFE_NAME)]
FixedValue = float | int | Annotated[str, Field(max_length=64)] | None
def whole_number(value: Any) -> Any:
    """An integral float as the int it is; anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Target = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False, strict=True)] | Annotated[StrictInt, Field(ge=1)]


class SpaceSpec(BaseModel):
    """Which parts of the configuration are searched, and any fixed parameters."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[Literal[METRICS]] = Field(default=list(SearchSpace.metrics), min_length=1)  # type: ignore[valid-type]
    scores: list[Literal[SCORES]] = Field(default=list(SearchSpace.scores), min_length=1, description=(  # type: ignore[valid-type]
        "importance searched: the weighted mixture of the metrics, or FLAP's standardised score"))
    aggregations: list[Literal[AGGREGATIONS]] = Field(default=list(SearchSpace.aggregations), min_length=1)  # type: ignore[valid-type]
    subset_mode: Literal[SUBSET_MODES] = Field(  # type: ignore[valid-type]
        default=SearchSpace.subset_mode, validation_alias=AliasChoices("subset_mode", "calibration"), description=(
            "how a trial's calibration subset is chosen: clusters of the pool weighted per trial, a random size and "
            "seed, or the whole pool (also accepted under its earlier name, calibration)"))
    subset_size: tuple[int, int] = SearchSpace.subset_size
    n_clusters: int = Field(default=SearchSpace.n_clusters, ge=1, le=64)
    attn_share: StrictBool = SearchSpace.attn_share
    scopes: list[Literal[SCOPES]] = Field(default=list(SearchSpace.scopes), min_length=1, description=(  # type: ignore[valid-type]
        "allocation scopes searched: a budget per layer, or one ranking of every unit (FLAP's)"))
    depth: StrictBool = Field(default=SearchSpace.depth, description=(
        "also search how many whole decoder layers to drop (0 .. a quarter), those of lowest block influence"))
    repairs: list[Literal[REPAIR_MODES]] = Field(default=list(SearchSpace.repairs), min_length=1)  # type: ignore[valid-type]
    ridge: tuple[PositiveFloat, PositiveFloat] = Field(default=SearchSpace.ridge, description="searched on a log scale")
    iterations: tuple[Annotated[StrictInt, Field(ge=1, le=16)], Annotated[StrictInt, Field(ge=1, le=16)]] = Field(
        default=SearchSpace.iterations, description=(
            "steps FLAP's score may build the plan in, re-measured on the pruned model between them ([1, 1]: one)"))
    fixed: dict[Annotated[str, Field(max_length=64)], FixedValue] = Field(
        default_factory=dict, max_length=64, description="parameters not searched, e.g. {\"aggregation\": \"sum\"}")

    @field_validator("ridge", "iterations")
    @classmethod
    def _is_a_range(cls, value: tuple, info) -> tuple:
        if value[0] > value[1]:
            raise ValueError(f"{info.field_name} must be [min, max] with min <= max, got {list(value)}")
        return value


class FinetuneSpec(BaseModel):
    """LoRA fine-tuning of the best configuration after the search (not of every trial)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=LoRA.steps, ge=1, le=100_000)
    lr: float = Field(default=LoRA.lr, gt=0, le=1, strict=True)
    r: int = Field(default=LoRA.r, ge=1, le=256)
    alpha: int = Field(default=LoRA.alpha, ge=1, le=1024)
    batch_size: int = Field(default=LoRA.batch_size, ge=1, le=256)


class JobCreate(BaseModel):
    """A search job: what to prune, on which texts, how far, and how to search."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "smollm-20", "model": "smollm2-135m", "target": 0.2, "trials": 12, "pool_size": 16,
         "val_windows": 16, "test_windows": 32}]})

    name: str | None = Field(default=None, pattern=SAFE_NAME, description="also names the model archive")
    model: Reference = Field(default=SearchJob.model, max_length=200)
    calibration: list[Reference] = Field(default=list(SearchJob.calibration), min_length=1, max_length=8)
    evaluation: list[Reference] = Field(default_factory=list, max_length=8)
    heldout: list[Reference] | None = Field(default=None, max_length=8, description=(
        "out-of-domain test sources, never calibrated or validated on; null: the built-in sources the job "
        "does not use (when it uses one); [] for none"))
    target: Target | Annotated[list[Target], Field(min_length=1, max_length=8)] = Field(
        default=SearchJob.target, validation_alias=AliasChoices("target", "ratio"), description=(
            "share of all parameters to remove, in (0, 1), or a parameter count; a list of them runs one study "
            "per target on one loaded model and reports the trade-off (GET .../model?target=0.3 for each); also "
            "accepted under its earlier name, ratio"))
    trials: StrictInt = Field(default=SearchJob.trials, ge=1, description=(
        "searched trials to finish; the baselines (and each of their calibration draws) run besides them"))
    sampler: Literal[SAMPLERS] = SearchJob.sampler  # type: ignore[valid-type]
    pruner: Literal[PRUNERS] = SearchJob.pruner  # type: ignore[valid-type]
    seed: StrictInt = Field(default=SearchJob.seed, ge=0, le=2**31 - 1)
    pool_size: StrictInt = Field(default=SearchJob.pool_size, ge=1)
    seq_len: StrictInt = Field(default=SearchJob.seq_len, ge=8, le=8192)
    val_windows: StrictInt = Field(default=SearchJob.val_windows, ge=1)
    test_windows: StrictInt = Field(default=SearchJob.test_windows, ge=1)
    baselines: list[Literal[BASELINES]] = Field(default=list(DEFAULT_BASELINES), max_length=len(BASELINES))  # type: ignore[valid-type]
    baseline_draws: StrictInt = Field(default=SearchJob.baseline_draws, ge=1, le=16, description=(
        "calibration draws of each baseline that samples its calibration at random (llm-pruner); margins are "
        "against their mean"))
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    start: Literal[STARTS] = Field(default=SearchJob.start, description=(  # type: ignore[valid-type]
        "first searched trials: random (TPE's start-up), informed (LLM-Pruner's and FLAP's configurations and "
        "the shipped priors) or warm (also earlier studies in the storage that never saw the held-out sources)"))
    repair_windows: StrictInt = Field(default=SearchJob.repair_windows, ge=1, le=100_000, description=(
        "windows of each calibration source the repair's input moments are measured on"))
    finalists: StrictInt = Field(default=SearchJob.finalists, ge=1, le=64, description=(
        "best trials by validation re-scored on more validation windows before the final choice"))
    selection_windows: StrictInt = Field(default=SearchJob.selection_windows, ge=0, le=100_000, description=(
        "validation windows per source added for that re-scoring"))
    channel_multiple: StrictInt | None = Field(default=SearchJob.channel_multiple, ge=1, le=4096, description=(
        "kept MLP channels per layer in multiples of this (hardware-friendly sizes); null: 64 on CUDA, 1 on CPU"))
    min_speedup: float | None = Field(default=SearchJob.min_speedup, gt=1.0, lt=100.0, allow_inf_nan=False, strict=True,
                                      description=(
        "choose only a model predicted to decode at least this many times as fast as the unpruned one in llama.cpp "
        "on the worker (torch where llama.cpp is not installed); layers are then dropped as needed; null: no floor"))
    finetune: FinetuneSpec | None = Field(
        default=None, validation_alias=AliasChoices("finetune", "recover"), description=(
            "LoRA fine-tuning of the best model after the search (also accepted under its earlier name, recover)"))
    tasks: list[TaskName] = Field(default_factory=list, max_length=16, description=(
        "lm-eval tasks to score the unpruned model, the baselines and the best configuration on after the "
        "search: books-cloze and books-lastword are built in; hub tasks need allow_hub_datasets"))
    task_limit: StrictInt | None = Field(default=SearchJob.task_limit, ge=1, le=100_000,
                                         description="at most this many items per task")
    measure_cost: StrictBool = Field(default=SearchJob.measure_cost, description=(
        "after the search, measure decode and prefill speed and peak memory of the unpruned model, the baselines "
        "and the best on the worker's device"))
    cost_rounds: StrictInt = Field(default=SearchJob.cost_rounds, ge=1, le=50, description=(
        "interleaved rounds of that measurement (each model once per round): figures are medians with their range"))
    export_dtype: Literal[EXPORT_DTYPES] = Field(default=SearchJob.export_dtype, description=(  # type: ignore[valid-type]
        "dtype of the best model's weights on disk; auto: the dtype the model was released in (bf16 for SmolLM2)"))
    export_format: Literal[EXPORT_FORMATS] = Field(default=SearchJob.export_format, description=(  # type: ignore[valid-type]
        "gguf: the best model also as one GGUF file that llama.cpp, Ollama and LM Studio run "
        "(GET /v1/jobs/{id}/model?format=gguf)"))
    gguf_type: Literal[GGUF_TYPES] = Field(default=SearchJob.gguf_type, description=(  # type: ignore[valid-type]
        "the GGUF file's weights: f32, f16, bf16, or q8_0 and q4_k_m by llama.cpp's quantizer"))
    trust_remote_code: StrictBool = False

    @field_validator("trials", "seed", "pool_size", "seq_len", "val_windows", "test_windows", "baseline_draws",
                     "repair_windows", "finalists", "selection_windows", "channel_multiple", "task_limit",
                     "cost_rounds", mode="before")
    @classmethod
    def _whole_numbers(cls, value):
        """JSON has one kind of number: 5.0 is the whole number 5, as JSON Schema's ``integer`` says (strings and
        booleans are still refused). Not ``target``, where 1.0 is a share out of range, never a count of 1."""
        return whole_number(value)

    @field_validator("target")
    @classmethod
    def _targets_differ(cls, value):
        if isinstance(value, list):
            try:
                check_targets(value)
            except AdaPrunerError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def targets(self) -> list[float | int]:
        return list(self.target) if isinstance(self.target, list) else [self.target]

    def to_search_job(self, target: float | int | None = None) -> SearchJob:
        """The search of one target (default: the first)."""
        data = self.model_dump(exclude={"name", "trust_remote_code", "space"})
        data["target"] = self.targets[0] if target is None else target
        space = self.space.model_dump()
        for key in ("subset_size", "ridge", "iterations"):
            space[key] = tuple(space[key])
        return SearchJob.from_dict({**data, "space": SearchSpace.from_dict(space).to_dict(),
                                    "finetune": {**data["finetune"], "seed": self.seed} if self.finetune else None})


class Links(BaseModel):
    """Where to find the job's parts: itself, its trials, its model, its report and the dashboard."""

    self: str
    trials: str
    model: str
    report: str
    dashboard: str | None


class Progress(BaseModel):
    """A job's trials by state against its budget, with an estimate of the time left."""

    finished: int = Field(description="trials done: complete or stopped early, baselines included")
    running: int
    stopped_early: int = Field(description="of the finished, trials stopped early by the early-stopping pruner "
                                           "(Optuna's PRUNED state)")
    failed: int
    budget: int = Field(description="trials the job finishes: its searched trials and its baseline runs, per target")
    eta_seconds: float | None
    phase: str = Field(description="what the job is doing: 'loading model', 'pool statistics 12/64', 'trial 3/40'")


class TrialSummary(BaseModel):
    """One trial as served: its state, perplexities, configuration parameters, size and timings."""

    number: int
    target: float | int | None = Field(default=None, description="the target whose study it is in")
    state: str
    value: float | None = Field(description="validation perplexity")
    test_ppl: float | None
    heldout_ppl: float | None = None  # out-of-domain test: sources never calibrated or validated on
    baseline: str | None
    draw: int | None = Field(default=None, description="which calibration draw of a baseline that draws at random")
    params: dict[str, Any]
    windows: int | None
    removed_share: float | None = Field(description="the share of all parameters its plan removes")
    seconds: dict[str, float] | None
    worker: str | None
    fail_reason: str | None
    started: datetime | None
    completed: datetime | None

    @field_validator("started", "completed")
    @classmethod
    def _with_offset(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None  # Optuna's are naive local times


class TargetOut(BaseModel):
    """One target of a job: its study, its best configuration, LLM-Pruner's and the other baselines, what its
    models measured, and where its model downloads."""

    target: float | int
    study_name: str
    finished: int = Field(description="finished trials of this target's study")
    best: TrialSummary | None = None
    baselines: list[TrialSummary] = Field(default_factory=list)
    tasks: dict[str, Any] | None = None
    inference_cost: dict[str, Any] | None = None
    model: str = Field(description="GET it for this target's best model (once it is exported)")
    has_model: bool = False


class JobOut(BaseModel):
    """A job as served. Times are RFC 3339 with their offset (SQLite stores them without one: UTC)."""

    id: str
    name: str | None
    status: str
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    study_name: str
    progress: Progress | None = None
    best: TrialSummary | None = None
    baselines: list[TrialSummary] = Field(default_factory=list)
    unpruned: dict[str, float | dict[str, float]] | None = Field(default=None, description=(
        "the unpruned model's perplexities: validation, test, heldout, test_by_source and heldout_by_source "
        "(one per source)"))
    finetune: dict[str, Any] | None = Field(default=None, description=(
        "the best model's LoRA fine-tuning, when the job asked for one: steps, test perplexity before and after"))
    tasks: dict[str, Any] | None = Field(default=None, description=(
        "once the search is done: accuracy per task of the unpruned model, each baseline and the best "
        "(models.*.results), their means (mean_acc) with standard errors (mean_acc_stderr), and best_retained = "
        "the best's mean / the unpruned's, with best_retained_stderr"))
    inference_cost: dict[str, Any] | None = Field(default=None, description=(
        "once the search is done: measured decode/prefill tokens/s, parameters and peak memory of the unpruned "
        "model, each baseline and the best (models.*), and each as a multiple of the unpruned (speedups.*)"))
    targets: list[TargetOut] = Field(default_factory=list, description=(
        "one entry per target, each its own study; best, baselines, tasks and inference_cost above "
        "describe a job of one target, and are left empty for a job of several"))
    load: str | None = Field(default=None, description="once the job succeeded: the line of code that loads "
                                                        "the model folder from the downloaded archive")
    links: Links

    @field_validator("created_at", "started_at", "finished_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class JobList(BaseModel):
    """One page of jobs."""

    items: list[JobOut]
    total: int
    offset: int
    limit: int


class TrialList(BaseModel):
    """A job's trials."""

    items: list[TrialSummary]


class ErrorOut(BaseModel):
    """An error: a sentence, or (422, 403 on a field) a list naming the fields, as FastAPI's own."""

    detail: str | list[dict[str, Any]]
