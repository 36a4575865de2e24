"""The final choice: the best few trials by validation, re-scored on a second, larger draw of validation windows.

The best of 40 trials by 32 validation windows per source is partly the one whose windows happened to
suit it: the configurations at the top differ by less than that estimate's noise, and picking the
minimum over-fits it. So the ``finalists`` best completed trials (baselines included, each draw its own
trial) are rebuilt and scored again on the validation part with ``selection_windows`` more windows per
source (the search's own windows among them; never a test part), and the finalist best there is the
study's chosen trial. Both estimates are recorded (study attribute :attr:`~.record.StudyKey.SELECTION`), and
:func:`~adapruner.search.best.best_trial` returns the chosen trial, with its test perplexities measured
here if the search had not measured them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from ..evaluate import window_losses
from ..session import PruneConfig, PruningSession
from .job import SearchJob
from .objective import source_weights, test_scores, weighted_mean
from .record import StudyKey, TrialKey, meets_floor

TEST_KEYS = (TrialKey.TEST_PPL, TrialKey.TEST_PPL_BY_SOURCE, TrialKey.HELDOUT_PPL, TrialKey.HELDOUT_PPL_BY_SOURCE)


def finalists(trials: Sequence[FrozenTrial], n: int, min_speedup: float | None = None) -> list[FrozenTrial]:
    """The ``n`` completed trials of lowest validation perplexity (a stopped trial's estimate does not count) among
    those predicted to meet the speed-up floor, if there is one."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and not t.user_attrs.get(TrialKey.ESTIMATED) and meets_floor(t, min_speedup)]
    return sorted(complete, key=lambda t: (t.value, t.number))[:n]


def selection_perplexity(session: PruningSession, config: PruneConfig, target: float | int,
                         batch_size: int = 4, bar: tqdm | None = None) -> float:
    """The per-source geometric mean perplexity of ``config``'s pruned model on the selection windows (``bar``
    advanced by one per window)."""
    windows = session.windows("selection")
    weights = source_weights(session.window_sources("selection"))
    model = session.prune(config, target)[0]
    losses = {}
    for index, loss in window_losses(model, windows, batch_size):
        losses[index] = loss
        if bar is not None:
            bar.update()
    return math.exp(weighted_mean(losses, weights))


def select(session: PruningSession, job: SearchJob, trials: Sequence[FrozenTrial],
           known: dict[int, float] | None = None) -> dict:
    """Re-score the finalists among ``trials`` and choose: the record :attr:`~.record.StudyKey.SELECTION`
    stores. ``known``: trial numbers' selection perplexities already measured (another selection's, say)."""
    chosen_from = finalists(trials, job.finalists, job.min_speedup)
    if not chosen_from:
        return {}
    known = known or {}
    todo = [t for t in chosen_from if t.number not in known]
    with tqdm(total=len(todo) * session.windows("selection").shape[0], desc=f"selection of {len(todo)} finalists",
              unit="win", disable=not (session.progress and todo), leave=False) as bar:
        scored = []
        for t in chosen_from:
            if session.on_step is not None and t.number not in known:
                session.on_step("selection", todo.index(t), len(todo))
            scored.append({"trial": t.number, "val_ppl": t.value,
                           "selection_ppl": known[t.number] if t.number in known else selection_perplexity(
                               session, PruneConfig.from_dict(t.user_attrs[TrialKey.CONFIG]), job.target, bar=bar)})
    chosen = min(scored, key=lambda row: (row["selection_ppl"], row["trial"]))
    trial = next(t for t in chosen_from if t.number == chosen["trial"])
    tests = {k: trial.user_attrs[k] for k in TEST_KEYS if k in trial.user_attrs}
    if TrialKey.TEST_PPL not in tests:  # never the best so far during the search: measured now
        config = PruneConfig.from_dict(trial.user_attrs[TrialKey.CONFIG])
        tests = test_scores(session, session.prune(config, job.target)[0])
    windows = {s.name: int(session.source_windows(s, "selection").shape[0]) for s in session.eval_sources}
    return {"finalists": scored, "chosen": chosen["trial"], "windows": windows, "scores": tests}


def record_selection(study: optuna.Study, session: PruningSession, job: SearchJob) -> dict:
    """:func:`select` over the whole study, done once and stored with it."""
    if StudyKey.SELECTION not in study.user_attrs:
        record = select(session, job, study.get_trials(deepcopy=False))
        if record:
            study.set_user_attr(StudyKey.SELECTION, record)
    return study.user_attrs.get(StudyKey.SELECTION, {})


def chosen_trial(study: optuna.Study, record: dict | None = None) -> FrozenTrial | None:
    """The selected trial with its selection scores among its user attributes (a copy; ``None`` before a
    selection)."""
    record = record if record is not None else study.user_attrs.get(StudyKey.SELECTION)
    if not record:
        return None
    trial = copy.copy(study.get_trials(deepcopy=False)[record["chosen"]])
    row = next(r for r in record["finalists"] if r["trial"] == record["chosen"])
    trial.user_attrs = {**trial.user_attrs, **record["scores"], TrialKey.SELECTION_PPL: row["selection_ppl"]}
    return trial
