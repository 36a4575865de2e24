"""Several sizes in one job: one study per target, sharing one session, and the trade-off they draw.

A job may ask for several targets (``--target 0.1,0.2,0.3``). Each target is an ordinary study of its own
(named ``STUDY-r0.2``), searched one after the other on one :class:`~adapruner.session.PruningSession`,
so the model loads once and the pool statistics are computed once. One study per target rather than
one multi-objective study, because:

- a user deploys a size, and gets the best model *at that size*, beside LLM-Pruner's default at the
  same size; a Pareto front mixes sizes and leaves the choice of a point (and its baselines) open;
- early stopping (Optuna's pruners, the paired estimate) works on single-objective studies only, and it
  is what makes each trial cheap;
- every target's study resumes, reports and exports like a one-target job, with nothing new to learn.

The trade-off report then draws test perplexity against parameters kept and against measured decode
speed: the best configuration and LLM-Pruner's default at each target, the unpruned model as a point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import optuna

from ..errors import AdaPrunerError
from ..session import PruningSession
from .best import UNPRUNED, best_trial
from .job import SearchJob
from .record import StudyKey, TrialKey, stored
from .report import baseline_trials
from .study import SearchResult, open_session, run_search

REFERENCE = "llm-pruner"


def target_study_name(base: str, target: float | int, several: bool) -> str:
    """A one-target job's study is ``base``; each of several targets' is ``base-r{target}``."""
    return f"{base}-r{target:g}" if several else base


def check_targets(targets: Sequence[float | int]) -> None:
    """Several targets must differ as their studies are named (``r0.2``): a repeat, or two so close that
    they print alike, would share one study."""
    names = [f"r{t:g}" for t in targets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdaPrunerError(f"target lists a target twice (or two that name one study, {repeated[0]}): "
                             f"{', '.join(map(str, targets))}")


def run_targets(job: SearchJob, targets: Sequence[float | int], storage_url: str | None, study_name: str | None = None,
                *, session: PruningSession | None = None, out_dir: str | Path | None = None,
                should_stop: Callable[[], bool] | None = None, **options) -> list[SearchResult]:
    """Run one study per target in ``targets`` (``job.target`` is replaced by each); ``options`` go to
    :func:`~adapruner.search.study.run_search`. Stops after the first target that did not finish
    (cancelled), returning the results so far."""
    check_targets(targets)
    several = len(targets) > 1
    base = study_name or job.default_study_name
    session = session or open_session(job, options.get("device"), options.get("dtype"),
                                      progress=options.get("progress", True))
    results = []
    for target in targets:
        out = None if out_dir is None else Path(out_dir) / f"r{target:g}" if several else Path(out_dir)
        result = run_search(replace(job, target=target), storage_url, target_study_name(base, target, several),
                            session=session,
                            out_dir=out, should_stop=should_stop, **options)
        results.append(result)
        if result.artifact_id is None:
            break
    return results


def tradeoff_points(studies: Sequence[optuna.Study]) -> list[dict]:
    """One row per model: the unpruned one (once), then each target's best and LLM-Pruner's default, with
    parameters kept, test and held-out perplexity and measured decode tokens/s (None where not measured)."""
    rows: list[dict] = []
    for study in studies:
        cost = study.user_attrs.get(StudyKey.INFERENCE_COST, {}).get("models", {})
        target = SearchJob.from_dict(study.user_attrs[StudyKey.JOB]).target
        if not rows:
            unpruned = stored(study.user_attrs, StudyKey.UNPRUNED, {})
            data = study.user_attrs.get(StudyKey.DATA, {})
            rows.append({"model": UNPRUNED, "target": 0.0, "params": data.get("params"),
                         "test_ppl": unpruned.get("test"), "heldout_ppl": unpruned.get("heldout"),
                         "decode": cost.get(UNPRUNED, {}).get("decode_tokens_per_s")})
        trials = [("best", best_trial(study)),
                  (REFERENCE, baseline_trials(study).get(REFERENCE))]
        for label, trial in trials:
            if trial is None:
                continue
            attrs = trial.user_attrs
            rows.append({"model": label, "target": target, "params": attrs.get(TrialKey.PARAMS_KEPT),
                         "test_ppl": attrs.get(TrialKey.TEST_PPL), "heldout_ppl": attrs.get(TrialKey.HELDOUT_PPL),
                         "decode": cost.get(label, {}).get("decode_tokens_per_s")})
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def tradeoff_markdown(studies: Sequence[optuna.Study], png: str | None = None) -> str:
    rows = tradeoff_points(studies)
    lines = ["# Size, speed and quality", "",
             f"One study per target ({', '.join(s.study_name for s in studies)}); the best configuration of each "
             f"(by validation) beside LLM-Pruner's default at the same size. Test perplexity is in-domain; held-out "
             "is on texts never calibrated or validated on. Decode: greedy at batch 1 with the KV cache, measured "
             "after each search on the worker's device.", "",
             "| target | model | parameters | test ppl | held-out ppl | decode tokens/s |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        params = "—" if row["params"] is None else f"{row['params'] / 1e6:,.2f}M"
        lines.append(f"| {row['target']:g} | {row['model']} | {params} | {_cell(row['test_ppl'], '.2f')} | "
                     f"{_cell(row['heldout_ppl'], '.2f')} | {_cell(row['decode'], ',.1f')} |")
    if png:
        lines += ["", f"![trade-off]({png})"]
    return "\n".join(lines) + "\n"


def plot_tradeoff(studies: Sequence[optuna.Study], path: Path) -> Path | None:
    """Test perplexity against parameters kept and against decode tokens/s: best and LLM-Pruner's
    default at each target, the unpruned model as a point."""
    rows = [r for r in tradeoff_points(studies) if r["test_ppl"] is not None and r["params"] is not None]
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "params", "parameters kept (M)"), (axes[1], "decode", "decode tokens/s")):
        for model, style in (("best", "o-"), (REFERENCE, "s--")):
            points = sorted((r[key], r["test_ppl"]) for r in rows if r["model"] == model and r[key] is not None)
            if points:
                xs = [x / 1e6 if key == "params" else x for x, _ in points]
                ax.plot(xs, [y for _, y in points], style, label="best searched" if model == "best" else
                        "LLM-Pruner default")
        unpruned = [r for r in rows if r["model"] == UNPRUNED and r[key] is not None]
        if unpruned:
            x = unpruned[0][key] / 1e6 if key == "params" else unpruned[0][key]
            ax.plot([x], [unpruned[0]["test_ppl"]], "k*", markersize=12, label="unpruned")
        ax.set_xlabel(label)
        ax.set_ylabel("test perplexity")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tradeoff_report(studies: Sequence[optuna.Study], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_tradeoff(studies, out / "tradeoff.png")
    path = out / "tradeoff.md"
    path.write_text(tradeoff_markdown(studies, png.name if png else None))
    return path
