"""Run a search job as an Optuna study: any storage, resumable by name, shared by many processes.

A :class:`SearchJob` says everything that defines a search (model, texts, target, budget, sampler,
space, seed). :func:`run_search` opens the study (creating it, with its baselines enqueued, or
resuming it), then claims and runs trials until the study holds ``job.trials`` finished (complete
or pruned) trials, however many processes share it; finally it rebuilds the best configuration's
pruned model, saves it and uploads it as an Optuna artifact.

Heartbeats (RDB storages) mark the trial of a process that died as failed, and
``RetryHeartbeatStaleTrialCallback`` queues it again, so a killed worker loses nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.artifacts import upload_artifact
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from .. import __version__
from ..data import check_heldout, training_windows
from ..errors import AdaPrunerError
from ..evaluate import perplexity
from ..export import save_pruned
from ..finetune import LoRA, finetune
from ..session import PruneConfig, PruningSession
from .artifacts import artifact_store
from .baselines import BASELINES, DEFAULT_BASELINES, baseline_config
from .lock import StudyLock
from .objective import Objective, geometric_mean
from .samplers import (
    ESTIMATING_SAMPLERS,
    PRUNERS,
    SAMPLERS,
    chosen_experimental_features,
    make_pruner,
    make_sampler,
    reports_running_mean,
)
from .space import SearchSpace, cluster_pool

logger = logging.getLogger(__name__)

# A worker beats every HEARTBEAT seconds; one silent for GRACE seconds is taken for dead.
HEARTBEAT_SECONDS = int(os.environ.get("ADAPRUNER_HEARTBEAT_SECONDS", 15))
GRACE_SECONDS = int(os.environ.get("ADAPRUNER_GRACE_SECONDS", 45))
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SearchJob:
    """Everything that defines a search; stored with the study so a resume can check it matches."""

    model: str = "smollm2-135m"
    # Two kinds of text by default, so that validation does not reward fitting one of them.
    calibration: tuple[str, ...] = ("builtin:books", "builtin:wiki")
    evaluation: tuple[str, ...] = ()  # default: the calibration sources
    heldout: tuple[str, ...] | None = None  # test only; None: the built-in sources not used above
    ratio: float | int = 0.2  # a share of all parameters, or a parameter count
    trials: int = 30  # finished trials in the study, baselines included
    sampler: str = "tpe"
    pruner: str = "wilcoxon"
    seed: int = 0
    pool_size: int = 64
    seq_len: int = 128
    val_windows: int = 32  # per evaluation source
    test_windows: int = 64
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    space: SearchSpace = field(default_factory=SearchSpace)
    recover: LoRA | None = None  # fine-tune the best configuration after the search

    def __post_init__(self) -> None:
        fraction = isinstance(self.ratio, float) and 0 < self.ratio < 1
        count = isinstance(self.ratio, int) and not isinstance(self.ratio, bool) and self.ratio >= 1
        if not (fraction or count):
            raise AdaPrunerError(f"ratio must be a fraction in (0, 1) or a whole parameter count >= 1, "
                                 f"got {self.ratio!r}")
        if self.trials < 1:
            raise AdaPrunerError(f"trials must be at least 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise AdaPrunerError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.pruner not in PRUNERS:
            raise AdaPrunerError(f"unknown pruner {self.pruner!r} (choose from {', '.join(PRUNERS)})")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise AdaPrunerError(f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})")
        for name in ("pool_size", "seq_len", "val_windows", "test_windows"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise AdaPrunerError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.calibration:
            raise AdaPrunerError("a search needs at least one calibration source")
        if self.heldout is not None:
            check_heldout([*self.calibration, *self.evaluation], self.heldout)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["space"] = self.space.to_dict()
        return data

    def identity(self) -> dict:
        """What must match to resume a study: everything but the budget, which may grow."""
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k != "trials"}

    @classmethod
    def from_dict(cls, data: dict) -> SearchJob:
        data = dict(data)
        data["space"] = SearchSpace.from_dict(data.get("space", {}))
        if data.get("recover") is not None:
            recover = dict(data["recover"])
            recover["targets"] = tuple(recover.get("targets", LoRA.targets))
            data["recover"] = LoRA(**recover)
        for key in ("calibration", "evaluation", "baselines", "heldout"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def default_study_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model.replace('/', '_')}-r{self.ratio:g}-{digest}"


@dataclass
class SearchResult:
    study: optuna.Study
    best_trial: optuna.trial.FrozenTrial | None
    model_dir: Path | None
    artifact_id: str | None


def make_storage(url: str | None, create_tables: bool = True) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url`` (``None``: in memory), with heartbeats and retry of dead trials.

    ``create_tables=False`` for processes that must find the schema prepared (service workers/API).
    """
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # several processes on one file wait, not fail
        Path(url.split("///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together on a fresh database would race to create Optuna's tables.
    with StudyLock(url, "__schema__") if create_tables else contextlib.nullcontext(), chosen_experimental_features():
        return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create_tables,
                          heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))


def has_heartbeats(storage: optuna.storages.BaseStorage) -> bool:
    # Optuna's heartbeat interface is private; RDBStorage and the cache a Study wraps it in both have it.
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials of processes that died. Call it holding the study lock.

    Optuna's heartbeat check finds a dead process's trial only once the trial has a heartbeat. A process
    killed between creating its trial and the first beat leaves one that stays RUNNING forever and
    holds a slot of the budget. A live process marks its trial (a heartbeat, and the ``worker``
    attribute: see ``run_search``) before it releases the lock, so an unmarked running trial seen
    under the lock belongs to a process that died holding it.
    """
    storage = study._storage
    with chosen_experimental_features():
        optuna.storages.fail_stale_trials(study)
    if not has_heartbeats(storage):
        return
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" in trial.user_attrs:
            continue
        logger.warning("trial %d was left running by a process that died before its first heartbeat: "
                       "failing it", trial.number)
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))


def count_trials(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


def open_session(job: SearchJob, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, progress: bool = True) -> PruningSession:
    return PruningSession.open(
        job.model, job.calibration, job.evaluation or None, pool_size=job.pool_size, seq_len=job.seq_len,
        seed=job.seed, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        max_eval_windows={"validation": job.val_windows, "test": job.test_windows}, progress=progress,
        heldout=job.heldout,
    )


def create_study(storage: optuna.storages.BaseStorage, name: str, job: SearchJob) -> optuna.Study:
    """Create the study with its spec and queued baselines; an existing study must have the same spec."""
    sampler = make_sampler(job.sampler, job.seed)
    pruner = make_pruner(job.pruner, job.val_windows)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                    pruner=pruner, load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        stored, wanted = study.user_attrs.get("job"), job.identity()
        # Read the stored job back through the dataclass, so fields added since it was stored take
        # their defaults and an older study still resumes.
        known = SearchJob.from_dict(stored).identity() if stored is not None else None
        if known is not None and known != wanted:
            changed = sorted(k for k in wanted if known.get(k) != wanted[k])
            raise AdaPrunerError(f"study {name!r} exists with a different job ({', '.join(changed)} differ); "
                                 "use another --study name") from None
        if stored is not None and stored.get("trials") != job.trials:
            study.set_user_attr("job", job.to_dict())  # the budget grew or shrank: record the new one
        return study
    # Baselines first, before anyone else can ask for a trial.
    for baseline in job.baselines[: job.trials]:
        study.enqueue_trial({}, user_attrs={"baseline": baseline})
    study.set_user_attr("job", job.to_dict())
    study.set_user_attr("adapruner_version", __version__)
    return study


def describe_data(study: optuna.Study, session: PruningSession) -> None:
    """Record the texts' content hashes and the unpruned model's perplexities with the study (once)."""
    if "dense" in study.user_attrs:
        return
    study.set_user_attr("data", {
        "pool_hash": session.pool.content_hash,
        "pool_sources": sorted(set(session.pool.source_of)),
        "sources": {s.name: s.hashes for s in session.eval_sources},
        "heldout_sources": {s.name: s.hashes["test"] for s in session.heldout_sources},
        "splits": {s.name: s.split_description for s in [*session.eval_sources, *session.heldout_sources]},
        "val_windows": int(session.windows("validation").shape[0]),
        "test_windows": int(session.windows("test").shape[0]),
        "params": session.structure.total_params,
    })

    def ppl(source, split):
        return perplexity(session.model, session.source_windows(source, split), progress=session.progress,
                          desc=f"unpruned {source.name} {split}").ppl

    # Per-source geometric means, as the objective scores trials.
    dense = {split: geometric_mean(ppl(s, split) for s in session.eval_sources) for split in ("validation", "test")}
    heldout = {s.name: ppl(s, "test") for s in session.heldout_sources}
    if heldout:
        dense["heldout"] = geometric_mean(heldout.values())
        dense["heldout_by_source"] = heldout
    study.set_user_attr("dense", dense)


def run_search(
    job: SearchJob,
    storage_url: str | None,
    study_name: str | None = None,
    *,
    session: PruningSession | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out_dir: str | Path | None = None,
    artifact_dir: str | Path | None = None,  # a folder or s3://BUCKET
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    poll_seconds: float = 5.0,
    storage: optuna.storages.BaseStorage | None = None,
) -> SearchResult:
    """Run (or join, or resume) the study until it holds ``job.trials`` finished trials."""
    storage = storage or make_storage(storage_url)
    name = study_name or job.default_study_name
    study = create_study(storage, name, job)
    session = session or open_session(job, device, dtype, progress=progress)
    describe_data(study, session)
    clusters = cluster_pool(session.statistics.embedding, job.space.n_clusters, job.seed)
    baselines = {b: baseline_config(b, session, job.seed) for b in job.baselines}
    objective = Objective(session, job.space, clusters, job.ratio, baselines, job.seed,
                          running_mean=reports_running_mean(job.pruner),
                          estimate_stopped=job.sampler in ESTIMATING_SAMPLERS)
    lock = StudyLock(storage_url, name)

    def claimed_trial(trial: optuna.Trial) -> float:
        # Mark the trial as alive before other processes may look at it (see fail_dead_trials).
        if has_heartbeats(storage):
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", WORKER)
        lock.release()  # the trial exists now: other processes may claim theirs
        return objective(trial)

    finished, _ = count_trials(study)
    bar = tqdm(total=job.trials, initial=finished, desc=f"search {name}", unit="trial", disable=not progress)
    failures = 0
    while True:
        if should_stop is not None and should_stop():
            break
        lock.acquire()
        try:
            fail_dead_trials(study)
            finished, running = count_trials(study)
            if finished >= job.trials:
                break
            full = finished + running >= job.trials
            if not full:
                before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
                study.optimize(claimed_trial, n_trials=1, catch=(Exception,), gc_after_trial=True)
                failures += len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
        finally:
            lock.release()
        if full:  # other processes hold the last slots: wait for them (or their heartbeat to lapse)
            time.sleep(poll_seconds)
        elif failures > job.trials:
            raise AdaPrunerError(f"{failures} trials failed; see their fail_reason attribute in the study")
        bar.n = count_trials(study)[0]
        best = _best(study)
        if best is not None:
            bar.set_postfix(best_val_ppl=f"{best.value:.3f}", refresh=False)
        bar.refresh()
    bar.close()
    if count_trials(study)[0] < job.trials:  # stopped early (cancelled)
        return SearchResult(study, _best(study), None, None)
    with lock:
        model_dir, artifact_id = export_best(study, storage, session, job, out_dir,
                                             artifact_dir or default_artifact_dir(storage_url))
    return SearchResult(study, _best(study), model_dir, artifact_id)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def default_artifact_dir(storage_url: str | None) -> Path:
    if storage_url and storage_url.startswith("sqlite:///") and ":memory:" not in storage_url:
        db = Path(storage_url.removeprefix("sqlite:///"))
        return db.with_name(db.stem + "-artifacts")
    return Path("runs") / "artifacts"


def export_best(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    session: PruningSession,
    job: SearchJob,
    out_dir: str | Path | None,
    artifact_dir: str | Path,
) -> tuple[Path | None, str | None]:
    """Rebuild the best trial's pruned model, save it to ``out_dir/model`` and upload it as an artifact.

    Done once per study: a later call (another process, a resume) finds the artifact recorded and only
    saves the folder if asked to.
    """
    best = _best(study)
    if best is None:
        return None, None
    recorded = study.user_attrs.get("best_model")
    if recorded and recorded.get("trial") == best.number and out_dir is None:
        return None, recorded["artifact_id"]  # another process exported it already
    config = PruneConfig.from_dict(best.user_attrs["config"])
    pruned, plan = session.prune(config, job.ratio)
    if [[s["num_key_value_heads"], s["intermediate_size"]] for s in plan.sizes()] != best.user_attrs["sizes"]:
        raise AdaPrunerError(f"rebuilding trial {best.number} gave other layer sizes than the trial recorded")
    info = {"base_model": job.model, "study": study.study_name, "trial": best.number, "config": config.to_dict(),
            "ratio": plan.ratio, "val_ppl": best.value, "test_ppl": best.user_attrs.get("test_ppl")}
    if job.recover is not None and job.recover.steps:
        pruned, info["recovery"] = recover(pruned, session, job.recover, best.user_attrs.get("test_ppl"))
        study.set_user_attr("recovery", info["recovery"])
    model_dir = None
    if out_dir is not None:
        model_dir = save_pruned(pruned, session.tokenizer, Path(out_dir) / "model", info=info)
    if recorded and recorded.get("trial") == best.number:
        return model_dir, recorded["artifact_id"]
    store = artifact_store(artifact_dir)
    with tempfile.TemporaryDirectory(prefix="adapruner-export-") as tmp:
        folder = model_dir or save_pruned(pruned, session.tokenizer, Path(tmp) / "model", info=info)
        archive = Path(tmp) / f"{study.study_name}-trial{best.number}.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(folder, arcname="model")
        artifact_id = upload_artifact(artifact_store=store, file_path=str(archive), study_or_trial=study,
                                      mimetype="application/x-tar")
    study.set_user_attr("best_model", {"trial": best.number, "artifact_id": artifact_id,
                                       "artifact_store": str(artifact_dir)})
    return model_dir, artifact_id


def recover(model, session: PruningSession, lora: LoRA, test_before: float | None) -> tuple[object, dict]:
    """LoRA-fine-tune the best pruned model on the calibration sources' pool text; test ppl before/after."""
    if test_before is None:
        test_before = perplexity(model, session.windows("test"), progress=session.progress, desc="test before").ppl
    train = training_windows(session.tokenizer, session.train_sources or session.eval_sources, session.pool.seq_len)
    result = finetune(model, train, lora, progress=session.progress)
    after = perplexity(result.model, session.windows("test"), progress=session.progress, desc="test after").ppl
    return result.model, {"steps": lora.steps, "r": lora.r, "lr": lora.lr, "batch_size": lora.batch_size,
                          "seconds": round(result.seconds, 1), "test_ppl_before": test_before,
                          "test_ppl_after": after, "loss_first": result.losses[0],
                          "loss_last": sum(result.losses[-10:]) / len(result.losses[-10:])}
