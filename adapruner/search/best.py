"""The best configuration of a finished study: rebuilt, saved, uploaded as an artifact, optionally fine-tuned."""

from __future__ import annotations

import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from ..data import training_windows
from ..errors import AdaPrunerError
from ..evaluate import perplexity
from ..export import save_pruned
from ..finetune import LoRA, finetune
from ..models import export_dtype
from ..session import PruneConfig, PruningSession
from ..to_gguf import write_gguf
from .artifacts import artifact_store
from .baselines import baseline_config
from .job import SearchJob
from .record import StudyKey, TrialKey, meets_floor, stored_sizes
from .selection import chosen_trial

UNPRUNED = "unpruned"
GGUF_NAME = "model.gguf"  # the best model as GGUF (export_format gguf), beside its folder
GGUF_ARTIFACT = "gguf_artifact_id"  # its artifact, in the study's best-model record


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's chosen trial once the finalists are re-scored (:mod:`.selection`), before that the best by
    validation among the trials that meet the job's speed-up floor (all, without one); ``None`` while no such trial
    has completed."""
    chosen = chosen_trial(study)
    if chosen is not None:
        return chosen
    floor = study.user_attrs.get(StudyKey.JOB, {}).get("min_speedup")
    if floor is None:
        try:
            return study.best_trial
        except ValueError:
            return None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and meets_floor(t, floor)]
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None


def compared_models(study: optuna.Study, session: PruningSession, job: SearchJob,
                    share_unchanged: bool = False) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """What a search is judged on after it ends: the unpruned model, each baseline and the best
    configuration (as searched), each built only when called, so that one pruned copy need exist at a time
    (``share_unchanged``: copies that share the unpruned model's uncut tensors, to hold several at once)."""
    def build(config: PruneConfig) -> torch.nn.Module:
        return session.prune(config, job.target, share_unchanged=share_unchanged)[0]

    models: list[tuple[str, Callable[[], torch.nn.Module]]] = [(UNPRUNED, lambda: session.model)]
    for name in job.baselines:  # a baseline that draws its calibration: its first draw
        models.append((name, lambda name=name: build(baseline_config(name, session, job.seed, target=job.target))))
    best = best_trial(study)
    if best is not None:
        config = PruneConfig.from_dict(best.user_attrs[TrialKey.CONFIG])
        models.append(("best", lambda: build(config)))
    return models


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
    best = best_trial(study)
    if best is None:
        return None, None
    recorded = study.user_attrs.get(StudyKey.BEST_MODEL)
    if recorded and recorded.get("trial") == best.number and out_dir is None:
        return None, recorded["artifact_id"]  # another process exported it already
    config = PruneConfig.from_dict(best.user_attrs[TrialKey.CONFIG])
    pruned, plan = session.prune(config, job.target)
    recorded_drop = best.user_attrs.get(TrialKey.DROPPED_LAYERS, [])
    if stored_sizes(plan.sizes()) != best.user_attrs[TrialKey.SIZES] or list(plan.dropped) != recorded_drop:
        raise AdaPrunerError(f"rebuilding trial {best.number} gave other layer sizes than the trial recorded")
    info = {"base_model": job.model, "study": study.study_name, "trial": best.number, "config": config.to_dict(),
            "removed_share": plan.removed_share, "val_ppl": best.value,
            "test_ppl": best.user_attrs.get(TrialKey.TEST_PPL)}
    if job.finetune is not None and job.finetune.steps:
        pruned, info["finetune"] = finetune_best(pruned, session, job.finetune, best.user_attrs.get(TrialKey.TEST_PPL))
        study.set_user_attr(StudyKey.FINETUNE, info["finetune"])
    model_dir, dtype = None, export_dtype(job.export_dtype, job.model, pruned)
    gguf_file = None
    if out_dir is not None:
        model_dir = save_pruned(pruned, session.tokenizer, Path(out_dir) / "model", info=info, dtype=dtype)
        if job.export_format == "gguf":
            gguf_file = write_gguf(model_dir, Path(out_dir) / GGUF_NAME, job.gguf_type, progress=session.progress)
    if recorded and recorded.get("trial") == best.number:
        return model_dir, recorded["artifact_id"]
    store = artifact_store(artifact_dir)
    record = {"trial": best.number, "artifact_store": str(artifact_dir)}
    with tempfile.TemporaryDirectory(prefix="adapruner-export-") as tmp:
        folder = model_dir or save_pruned(pruned, session.tokenizer, Path(tmp) / "model", info=info, dtype=dtype)
        archive = Path(tmp) / f"{study.study_name}-trial{best.number}.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(folder, arcname="model")
        record["artifact_id"] = upload_artifact(artifact_store=store, file_path=str(archive), study_or_trial=study,
                                                mimetype="application/x-tar")
        if job.export_format == "gguf":
            gguf_file = gguf_file or write_gguf(folder, Path(tmp) / GGUF_NAME, job.gguf_type,
                                                progress=session.progress)
            record[GGUF_ARTIFACT] = upload_artifact(artifact_store=store, file_path=str(gguf_file),
                                                    study_or_trial=study, mimetype="application/octet-stream")
    study.set_user_attr(StudyKey.BEST_MODEL, record)
    return model_dir, record["artifact_id"]


def finetune_best(model, session: PruningSession, lora: LoRA, test_before: float | None) -> tuple[object, dict]:
    """LoRA-fine-tune the best pruned model on the calibration sources' pool text; test ppl before/after."""
    if test_before is None:
        test_before = perplexity(model, session.windows("test"), progress=session.progress, desc="test before").ppl
    train = training_windows(session.tokenizer, session.train_sources or session.eval_sources, session.pool.seq_len)
    result = finetune(model, train, lora, progress=session.progress)
    after = perplexity(result.model, session.windows("test"), progress=session.progress, desc="test after").ppl
    return result.model, {"steps": lora.steps, "r": lora.r, "lr": lora.lr, "batch_size": lora.batch_size,
                          "seconds": round(result.seconds, 1), "test_ppl_before": test_before,
                          "test_ppl_after": after, "loss_first": result.losses[0],
                          "loss_last": result.final_loss}
