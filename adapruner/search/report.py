"""A study's report: the job, the baselines beside the best configuration, the best-so-far curve
(PNG), parameter importances and where the time went."""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..decode_time import DecodeTime
from ..export import load_instructions
from .accuracy import accuracy_table
from .best import best_trial
from .cost import cost_table
from .job import SearchJob
from .record import StudyKey, TrialKey, baseline_of, draw_of, stored


@dataclass(frozen=True)
class CurvePoint:
    """One point of the search curve: after ``finished`` trials, the best trial so far and its perplexities."""

    finished: int  # how many trials had finished
    trial: int  # the best trial at that point
    val_ppl: float
    test_ppl: float | None


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sorted(trials, key=lambda t: (t.datetime_complete, t.number))


def best_so_far(study: optuna.Study) -> list[CurvePoint]:
    """The best validation perplexity (and that trial's test perplexity) after each finished trial."""
    points, best = [], None
    for n, trial in enumerate(finished_trials(study), start=1):
        if trial.state == TrialState.COMPLETE and (best is None or trial.value < best.value):
            best = trial
        if best is not None:
            points.append(CurvePoint(n, best.number, best.value, best.user_attrs.get(TrialKey.TEST_PPL)))
    return points


def baseline_draws(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    """Each baseline's completed trials, one per draw (the first completed trial of each draw)."""
    found: dict[str, dict[int, FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        name = trial.user_attrs.get(TrialKey.BASELINE)
        if name:
            found.setdefault(name, {}).setdefault(trial.user_attrs.get(TrialKey.DRAW, 0), trial)
    return {name: [runs[d] for d in sorted(runs)] for name, runs in found.items()}


MEANS = (TrialKey.VAL_PPL, TrialKey.TEST_PPL, TrialKey.HELDOUT_PPL)
MEANS_BY_SOURCE = (TrialKey.TEST_PPL_BY_SOURCE, TrialKey.HELDOUT_PPL_BY_SOURCE)


def expected(draws: list[FrozenTrial]) -> FrozenTrial:
    """What a baseline gives on average over its draws: a copy of the first draw's trial whose value and
    perplexities are the means over the draws (arithmetic, per source too), with each draw's under ``draws``."""
    if len(draws) == 1:
        return draws[0]
    trial = copy.copy(draws[0])
    attrs = dict(trial.user_attrs)
    for key in MEANS:
        values = [t.user_attrs[key] for t in draws if t.user_attrs.get(key) is not None]
        if values:
            attrs[key] = statistics.mean(values)
    for key in MEANS_BY_SOURCE:
        tables = [t.user_attrs[key] for t in draws if t.user_attrs.get(key)]
        if tables:
            attrs[key] = {name: statistics.mean(table[name] for table in tables) for name in tables[0]}
    attrs[TrialKey.DRAWS] = [{"trial": t.number, "draw": draw_of(t), "val_ppl": t.value,
                       **{k: t.user_attrs.get(k) for k in MEANS[1:] + MEANS_BY_SOURCE}} for t in draws]
    trial.user_attrs = attrs
    trial.value = statistics.mean(t.value for t in draws)
    return trial


def baseline_trials(study: optuna.Study) -> dict[str, FrozenTrial]:
    """Each baseline's result: its trial, or for a baseline scored over several draws their mean (:func:`expected`)."""
    return {name: expected(draws) for name, draws in baseline_draws(study).items()}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def describe_config(config: dict) -> str:
    weights = {m: w for m, w in config["mixture"]["weights"].items() if w > 0}
    total = sum(weights.values())
    mixture = ", ".join(f"{m} {w / total:.2f}" for m, w in sorted(weights.items(), key=lambda kv: -kv[1]))
    alloc = config["allocation"]
    share = "proportional" if alloc["attn_share"] is None else f"{alloc['attn_share']:.2f}"
    scope = "one ranking across layers" if alloc.get("scope") == "global" else "a budget per layer"
    drop = alloc.get("drop_layers", 0)
    depth = f"; {drop} whole layer{'s' if drop != 1 else ''} dropped" if drop else ""
    steps = config.get("iterations", 1)
    return (f"metrics: {mixture}; aggregation: {config['mixture']['aggregation']}; "
            f"calibration: {len(config['subset'])} samples; layers {alloc['first']}..{alloc['last'] or 'end'}, "
            f"{scope}, adaptive strength {alloc['strength']:.2f}, attention share {share}{depth}"
            + (f"; in {steps} steps" if steps > 1 else "") + f"; repair {describe_repair(config)}")


def describe_repair(config: dict) -> str:
    repair = config.get("repair", {"mode": "off"})  # configs stored before repair existed were not repaired
    if repair["mode"] in ("off", "bias"):
        return repair["mode"]
    return f"{repair['mode']}, ridge " + ("k/T" if repair["ridge"] is None else f"{repair['ridge']:.2g}")


def plot_curve(study: optuna.Study, path: Path) -> Path | None:
    points = best_so_far(study)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step([p.finished for p in points], [p.val_ppl for p in points], where="post", label="best validation ppl")
    tests = [(p.finished, p.test_ppl) for p in points if p.test_ppl is not None]
    if tests:
        ax.step(*zip(*tests, strict=True), where="post", linestyle="--", label="its test ppl")
    references = {f"{name} (test)": t.user_attrs.get(TrialKey.TEST_PPL) for name, t in baseline_trials(study).items()}
    references["unpruned (test)"] = stored(study.user_attrs, StudyKey.UNPRUNED, {}).get("test")
    for label, value in references.items():
        if value:
            ax.axhline(value, linewidth=0.8, color="grey", linestyle=":")
            ax.annotate(label, (1, value), fontsize=7, color="grey", va="bottom")
    ax.set_yscale("log")  # baselines can sit orders of magnitude above the search
    ax.set_xlabel("finished trials")
    ax.set_ylabel("perplexity")
    ax.set_title(study.study_name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _scores(item) -> dict:
    """The perplexities of a row: the unpruned model's dict, or a trial's user attributes."""
    if isinstance(item, dict):
        return {"val": item.get("validation"), "test": item.get("test"), "heldout": item.get("heldout"),
                "by_source": item.get("heldout_by_source", {})}
    attrs = item.user_attrs
    return {"val": item.value, "test": attrs.get(TrialKey.TEST_PPL), "heldout": attrs.get(TrialKey.HELDOUT_PPL),
            "by_source": attrs.get(TrialKey.HELDOUT_PPL_BY_SOURCE, {})}


def _results_table(rows, heldout_names: list[str]) -> list[str]:
    per_source = heldout_names if len(heldout_names) > 1 else []
    header = ["configuration", "validation", "test (in-domain)"]
    if heldout_names:
        header += ["held-out test"] + [f"held-out: {name}" for name in per_source]
    header += ["parameters kept", "repair"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for label, item, kept in rows:
        s = _scores(item)
        cells = [label, _fmt(s["val"]), _fmt(s["test"])]
        if heldout_names:
            cells += [_fmt(s["heldout"])] + [_fmt(s["by_source"].get(name)) for name in per_source]
        cells += [_fmt(kept, 0), _repair_cell(item)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _repair_cell(item) -> str:
    """How a trial's kept weights were re-fitted (``—`` for the unpruned model)."""
    config = item.user_attrs.get(TrialKey.CONFIG) if isinstance(item, FrozenTrial) else None
    return "—" if config is None else describe_repair(config)


def _draw_lines(baselines: dict[str, FrozenTrial]) -> list[str]:
    """Each drawn baseline's spread: its draws' validation and test perplexities."""
    lines = []
    for name, trial in baselines.items():
        draws = trial.user_attrs.get(TrialKey.DRAWS)
        if not draws:
            continue
        key = TrialKey.HELDOUT_PPL if trial.user_attrs.get(TrialKey.HELDOUT_PPL) else TrialKey.TEST_PPL
        values = [d[key] for d in draws if d.get(key) is not None]
        spread = f" (sd {statistics.stdev(values):.2f})" if len(values) > 1 else ""
        lines.append(f"- `{name}` over its {len(draws)} calibration draws: "
                     f"{'held-out' if key == 'heldout_ppl' else 'test'} perplexity "
                     + " / ".join(_fmt(v) for v in values) + f", mean {_fmt(statistics.mean(values))}{spread}; "
                     "validation " + " / ".join(_fmt(d["val_ppl"]) for d in draws) + ".")
    return [""] + lines if lines else []


def _selection_lines(record: dict | None) -> list[str]:
    """The finalists' two validation estimates and the choice between them."""
    if not record:
        return []
    windows = ", ".join(f"{name} {n}" for name, n in record["windows"].items())
    lines = ["", f"The {len(record['finalists'])} best trials by validation were re-scored on more validation "
             f"windows ({windows}) and the best there chosen (trial {record['chosen']}):", "",
             "| trial | validation | re-scored validation |", "|---:|---:|---:|"]
    lines += [f"| {r['trial']}{' (chosen)' if r['trial'] == record['chosen'] else ''} | {_fmt(r['val_ppl'])} | "
              f"{_fmt(r['selection_ppl'])} |" for r in record["finalists"]]
    return lines


def _floor_lines(job: SearchJob, decode_time: dict | None, best: FrozenTrial | None) -> list[str]:
    """The speed-up floor, the decode-time model it was predicted with, and what the choice is predicted to do."""
    if job.min_speedup is None or not decode_time:
        return []
    fit = DecodeTime.from_dict(decode_time)
    probes = ", ".join(f"{p.label} {1 / p.seconds:.1f} tok/s ({fit.residuals[p.label]:+.1%} off the fit)"
                       for p in fit.probes)
    predicted = best.user_attrs.get(TrialKey.SPEEDUP) if best is not None else None
    chosen = f"the chosen model: {predicted:.2f}x" if predicted else "no trial met it"
    return ["", f"Speed-up floor: only models predicted to decode at least {job.min_speedup:g}x as fast as the "
            f"unpruned one were chosen from ({chosen}). The prediction: a decode-time model fitted to probe models "
            f"timed in {fit.runtime} on the machine that ran the search ({probes}). What the chosen model really "
            "does is measured below (\"What the pruned models buy\"), when the search measured it."]


def margin_sentence(best: FrozenTrial, reference: FrozenTrial) -> str:
    """How the best configuration compares with the LLM-Pruner baseline: out-of-domain when there is a
    held-out test, since in-domain text is what the search was tuned on."""
    heldout = bool(best.user_attrs.get(TrialKey.HELDOUT_PPL))
    key, where = (TrialKey.HELDOUT_PPL, "held-out") if heldout else (TrialKey.TEST_PPL, "in-domain")
    ours, theirs = best.user_attrs.get(key), reference.user_attrs.get(key)
    if not ours or not theirs:
        return ""
    ratio = ours / theirs
    side = f"{1 - ratio:.1%} lower" if ratio <= 1 else f"{ratio - 1:.1%} higher"
    draws = reference.user_attrs.get(TrialKey.DRAWS)
    which = f"the mean of its {len(draws)} calibration draws" if draws else "this study's draw"
    return f"{where.capitalize()} test perplexity {ratio:.2f}x LLM-Pruner's default ({which}; {side})."


def load_line(trial: FrozenTrial, folder: str = "model") -> str | None:
    """The line of code that loads the model exported from ``trial`` (a folder named ``folder``)."""
    sizes = trial.user_attrs.get(TrialKey.SIZES)
    return load_instructions(folder, all(s == sizes[0] for s in sizes)) if sizes else None


def report_markdown(study: optuna.Study, curve_png: str | None = None) -> str:
    job = SearchJob.from_dict(study.user_attrs[StudyKey.JOB])
    data, unpruned = study.user_attrs.get(StudyKey.DATA, {}), stored(study.user_attrs, StudyKey.UNPRUNED, {})
    trials = study.get_trials(deepcopy=False)
    states = {s: sum(t.state == s for t in trials) for s in TrialState}
    searched = [t for t in finished_trials(study) if not t.user_attrs.get(TrialKey.BASELINE)]
    estimated = sum(bool(t.user_attrs.get(TrialKey.ESTIMATED)) for t in trials)
    lines = [f"# AdaPruner search `{study.study_name}`", ""]
    lines += [
        f"- model: `{job.model}` ({_fmt(data.get('params'), 0)} parameters), target: remove "
        + (f"{job.target:.2%} of all parameters" if isinstance(job.target, float) else f"{job.target:,} parameters"),
        f"- calibration: {', '.join(job.calibration)} — pool of {job.pool_size} windows of {job.seq_len} tokens "
        f"(sha256 {str(data.get('pool_hash', ''))[:12]})",
        f"- evaluation: {data.get('val_windows', '?')} validation / {data.get('test_windows', '?')} test windows; "
        + "; ".join(f"{name}: val {h['validation'][:12]}, test {h['test'][:12]}"
                    for name, h in data.get("sources", {}).items()),
        f"- sampler `{job.sampler}`, pruner `{job.pruner}`, seed {job.seed}, budget {job.trials} searched trials "
        f"and {len(job.baseline_runs)} baseline runs, {study.user_attrs.get(StudyKey.INFORMED_START, 0)} of the "
        f"searched "
        f"trials informed (LLM-Pruner's and FLAP's configurations, priors, earlier studies) "
        f"({states[TrialState.COMPLETE] - estimated} complete, "
        f"{states[TrialState.PRUNED] + estimated} stopped early, {states[TrialState.FAIL]} failed)",
        "",
        *[f"- split of {name}: {how}" for name, how in data.get("splits", {}).items()],
        "",
        "## Results (perplexity; lower is better)",
        "",
        "Test is the test part of the evaluation sources (in-domain); held-out is the test part of sources the "
        "search never calibrated or validated on (out-of-domain); each a geometric mean over its sources.",
        "",
    ]
    heldout_names = list(data.get("heldout_sources", {}))
    rows = [("unpruned", unpruned, data.get("params"))]
    baselines = baseline_trials(study)
    for name, trial in baselines.items():
        draws = trial.user_attrs.get(TrialKey.DRAWS)
        label = f"baseline: {name}" + (f" (mean of {len(draws)} draws)" if draws else "")
        rows.append((label, trial, trial.user_attrs.get(TrialKey.PARAMS_KEPT)))
    best = best_trial(study)
    if best is not None:
        rows.append((f"**best: trial {best.number}**", best, best.user_attrs.get(TrialKey.PARAMS_KEPT)))
    lines += _results_table(rows, heldout_names)
    lines += _draw_lines(baselines)
    lines += _selection_lines(study.user_attrs.get(StudyKey.SELECTION))
    if best is not None:
        lines += ["", f"Best configuration (trial {best.number}"
                  + (f", baseline {baseline_of(best)}" if baseline_of(best) else "")
                  + f"): {describe_config(best.user_attrs[TrialKey.CONFIG])}."]
        reference = baselines.get("llm-pruner")
        if reference is not None:
            lines += [margin_sentence(best, reference)]
        if load_line(best):
            lines += ["", f"Load the exported model (the `model` folder beside this report) with transformers alone: "
                      f"`{load_line(best)}`."]
    lines += _floor_lines(job, study.user_attrs.get(StudyKey.DECODE_TIME), best)
    tuned = stored(study.user_attrs, StudyKey.FINETUNE)
    if tuned:
        lines += ["", f"LoRA fine-tuning of the best configuration: r={tuned['r']}, {tuned['steps']} steps of "
                  f"{tuned['batch_size']} windows, lr {tuned['lr']:g} ({tuned['seconds']:.0f}s): test "
                  f"perplexity {_fmt(tuned['test_ppl_before'])} -> **{_fmt(tuned['test_ppl_after'])}** "
                  "(the exported model is the fine-tuned one)."]
    tasks = study.user_attrs.get(StudyKey.TASKS)
    if tasks:
        limit = f", at most {tasks['limit']} items per task" if tasks.get("limit") else ""
        lines += ["", f"## Downstream accuracy (lm-evaluation-harness{limit}; higher is better)", "",
                  *accuracy_table(tasks)]
        if tasks.get("log"):
            lines += ["", f"lm-evaluation-harness's own output (progress, warnings): `{tasks['log']}`."]
    cost = study.user_attrs.get(StudyKey.INFERENCE_COST)
    if cost:
        lines += ["", "## What the pruned models buy (measured)", "", *cost_table(cost)]
    if curve_png:
        lines += ["", f"![best so far]({curve_png})"]
    if searched:
        windows = [t.user_attrs.get(TrialKey.WINDOWS, 0) for t in searched]
        full = data.get("val_windows") or max(windows)
        seconds = [t.user_attrs.get(TrialKey.SECONDS, {}) for t in searched]
        phases = sorted({k for s in seconds for k in s})
        lines += ["", "## Cost", "",
                  f"Searched trials evaluated {statistics.mean(windows):.1f} of {full} validation windows on average "
                  f"({1 - statistics.mean(windows) / full:.0%} saved by early stopping).", "",
                  "| phase | mean seconds per searched trial |", "|---|---:|"]
        lines += [f"| {p} | {statistics.mean(s.get(p, 0.0) for s in seconds):.2f} |" for p in phases]
    lines += importance_lines(study)
    return "\n".join(lines) + "\n"


#: Completed searched trials below which parameter importances are not shown. Optuna's default evaluator
#: (PED-ANOVA) compares the top 10% of completed trials with the rest, and says itself that a region of fewer
#: than 2 trials is unreliable: 2 / 0.1 = 20. Measured: the 40-trial studies of the leave-one-source-out bench
#: completed 9 searched trials each (the early-stopping pruner stops the rest), the demo's 12 about 3.
MIN_TRIALS_FOR_IMPORTANCES = 20


def importance_lines(study: optuna.Study) -> list[str]:
    """The report's parameter importances, or one sentence saying why there are none."""
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if baseline_of(t) is None and t.params]
    heading = ["", "## Parameter importances (PED-ANOVA, Optuna's default)", ""]
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCES:
        return heading + [f"Omitted: {len(completed)} searched trials completed (the others were stopped early), "
                          f"and importances need at least {MIN_TRIALS_FOR_IMPORTANCES} to tell the parameters apart "
                          "(PED-ANOVA compares the best 10% with the rest)."]
    try:
        with warnings.catch_warnings():  # expected at these sizes; the threshold above keeps them rare
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return []
    rows = [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    return heading + ["| parameter | importance |", "|---|---:|", *rows]


def write_report(study: optuna.Study, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curve(study, out / "best_so_far.png")
    path = out / "report.md"
    path.write_text(report_markdown(study, png.name if png else None))
    return path
