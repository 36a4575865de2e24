"""A floor on the chosen model's decode speed-up: the decode-time model, the layers it asks to drop, the trials it
stops, the choice it restricts, and its refusals."""

import math

import optuna
import pytest
from helpers import make_tiny_model
from test_search import tiny_job, tiny_session

from adapruner.decode_time import DecodeTime, Probe, kept_weights, measure_decode_time, probe_plans
from adapruner.errors import AdaPrunerError
from adapruner.plan import LayerPlan, PruningPlan
from adapruner.prune import prune_model
from adapruner.search import SearchJob, SearchSpace, run_search
from adapruner.search import speed as speed_module
from adapruner.search.record import StudyKey, TrialKey
from adapruner.search.report import report_markdown
from adapruner.search.samplers import PRUNERS, FloorPruner, make_pruner
from adapruner.search.selection import finalists
from adapruner.search.speed import drop_range
from adapruner.structure import decoder_layers, model_structure


def synthetic(base: float, per_layer: float, per_weight: float, layers: int = 4, weights: int = 1000) -> DecodeTime:
    """A decode-time model fitted to probes that lie exactly on the given line."""
    shapes = [("unpruned", layers, weights), ("half the layers", layers // 2, weights // 2),
              ("half width", layers, weights // 2), ("mixed", 3 * layers // 4, 3 * weights // 5)]
    return DecodeTime.fit([Probe(label, n, w, base + per_layer * n + per_weight * w) for label, n, w in shapes],
                          "synthetic")


# -- the decode-time model ------------------------------------------------------------------------


def test_the_fit_recovers_the_line_the_probes_lie_on():
    fit = synthetic(0.002, 0.0005, 3e-6)
    assert fit.base == pytest.approx(0.002, rel=1e-6)
    assert fit.per_layer == pytest.approx(0.0005, rel=1e-6)
    assert fit.per_weight == pytest.approx(3e-6, rel=1e-6)
    assert all(abs(r) < 1e-9 for r in fit.residuals.values())
    # half the layers and half the weights: (2 + 2 + 3) / (2 + 1 + 1.5) ms
    assert fit.speedup(2, 500) == pytest.approx(0.007 / 0.0045)
    assert DecodeTime.from_dict(fit.to_dict()) == fit


def test_a_fit_needs_three_probes_of_different_shapes():
    with pytest.raises(AdaPrunerError, match="three probes"):
        DecodeTime.fit([Probe("a", 4, 100, 1.0), Probe("b", 2, 50, 0.5)], "x")
    with pytest.raises(AdaPrunerError, match="three probes"):  # one width: the two costs cannot be told apart
        DecodeTime.fit([Probe("a", 4, 100, 1.0), Probe("b", 2, 50, 0.5), Probe("c", 1, 25, 0.3)], "x")


def test_a_prediction_far_outside_the_probes_stays_finite():
    fit = synthetic(-0.01, 0.001, 1e-5)  # a negative base, as a small model in the caches gives
    assert math.isfinite(fit.speedup(1, 10)) and fit.speedup(1, 10) <= 1 / 0.05 + 1e-9


def test_kept_weights_are_the_pruned_models_layer_weights():
    model = make_tiny_model()
    structure = model_structure(model)
    for label, plan in probe_plans(structure).items():
        pruned = prune_model(model, plan)
        layers, weights = kept_weights(structure, plan)
        assert layers == len(decoder_layers(pruned)), label
        assert weights == sum(p.numel() for p in decoder_layers(pruned).parameters()), label


def test_the_probes_differ_in_depth_and_width():
    structure = model_structure(make_tiny_model())
    shapes = {label: kept_weights(structure, plan) for label, plan in probe_plans(structure).items()}
    assert shapes["half the layers"][0] == 2 and shapes["half width"][0] == 4
    assert shapes["half width"][1] < shapes["unpruned"][1]
    assert len({w / n for n, w in shapes.values()}) >= 2


@pytest.mark.parametrize("runtime", ["torch", "llama.cpp"])
def test_probes_are_timed_in_either_runtime(runtime, tiny_tokenizer):
    if runtime == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by make install")
    fit = measure_decode_time(make_tiny_model(), tiny_tokenizer, runtime, quant="f32", rounds=2, new_tokens=4)
    assert [p.label for p in fit.probes] == list(probe_plans(model_structure(make_tiny_model())))
    assert all(p.seconds > 0 for p in fit.probes)
    assert fit.runtime.startswith(runtime)
    assert fit.speedup(fit.unpruned.layers, fit.unpruned.weights) == pytest.approx(1.0)


# -- the layers a floor asks for -------------------------------------------------------------------


def test_the_fewest_drops_that_meet_the_floor():
    structure = model_structure(make_tiny_model())  # 4 layers
    per_layer = synthetic(0.0, 1.0, 0.0, weights=10**6)  # time grows with layers alone: 4 / (4 - d)
    assert drop_range(structure, 0.45, 2, per_layer, 1.3) == (1, 2)  # 4/3 >= 1.3
    assert drop_range(structure, 0.45, 2, per_layer, 1.9) == (2, 2)  # 4/2
    assert drop_range(structure, 0.45, 2, None, None) == (0, 2)
    with pytest.raises(AdaPrunerError, match="out of reach.*2 of 4 layers.*2.00x"):
        drop_range(structure, 0.45, 2, per_layer, 2.5)


def test_a_floor_met_by_width_alone_asks_for_no_drop():
    structure = model_structure(make_tiny_model())
    total = sum(s.params for s in structure.layers)
    per_weight = synthetic(0.0, 0.0, 1.0, weights=total)  # time grows with weights alone
    assert drop_range(structure, 0.45, 2, per_weight, 1.3)[0] == 0  # 45% of the weights gone: about 1.8x


# -- which trials count ------------------------------------------------------------------------------


def frozen(number: int, value: float, speedup: float | None, baseline: bool = False):
    attrs = {TrialKey.SPEEDUP: speedup} if speedup is not None else {}
    if baseline:
        attrs[TrialKey.BASELINE] = "llm-pruner"
    return optuna.trial.create_trial(value=value, user_attrs=attrs, intermediate_values={i: value for i in range(8)})


def test_the_finalists_are_those_that_meet_the_floor():
    trials = [frozen(0, 10.0, 1.0, baseline=True), frozen(1, 20.0, 1.6), frozen(2, 15.0, 1.2), frozen(3, 30.0, 1.5)]
    for n, t in enumerate(trials):
        t.number = n
    assert [t.number for t in finalists(trials, 4, 1.5)] == [1, 3]
    assert [t.number for t in finalists(trials, 4)] == [0, 2, 1, 3]


def test_the_pruner_compares_a_trial_with_the_trials_that_meet_the_floor():
    study = optuna.create_study(pruner=FloorPruner(optuna.pruners.WilcoxonPruner(p_threshold=0.1), 1.5))
    study.add_trial(frozen(0, 10.0, 1.0, baseline=True))  # far better, but below the floor
    study.add_trial(frozen(1, 40.0, 1.6))
    trial = study.ask()
    for step in range(8):
        trial.report(38.0, step)
    assert not trial.should_prune()  # better than the best that meets the floor, however far from the baseline
    plain = optuna.create_study(pruner=optuna.pruners.WilcoxonPruner(p_threshold=0.1))
    for t in (frozen(0, 10.0, 1.0, baseline=True), frozen(1, 40.0, 1.6)):
        plain.add_trial(t)
    trial = plain.ask()
    for step in range(8):
        trial.report(38.0, step)
    assert trial.should_prune()  # the same trial, judged against the baseline


# -- a search with a floor --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def floored(tiny_tokenizer, tmp_path_factory):
    """A tiny search at 45% with a floor of 1.3x under a decode time that grows with the layers alone, so
    that a model must drop one of its four layers to meet it."""
    folder = tmp_path_factory.mktemp("floor")
    measured = []

    def measure(model, tokenizer, runtime, quant):
        measured.append(runtime)
        return synthetic(0.0, 1.0, 0.0, weights=10**6)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(speed_module, "measure_decode_time", measure)
        job = tiny_job(trials=5, target=0.45, min_speedup=1.3, baselines=("flap",),
                       space=SearchSpace(subset_size=(2, 8), n_clusters=3, depth=True))
        result = run_search(job, f"sqlite:///{folder / 'runs.db'}", "floor", session=tiny_session(tiny_tokenizer),
                            out_dir=folder / "out", artifact_dir=folder / "artifacts", progress=False)
        # a second process (or a resume) takes the stored model: it measures nothing
        again = run_search(job, f"sqlite:///{folder / 'runs.db'}", "floor", session=tiny_session(tiny_tokenizer),
                           artifact_dir=folder / "artifacts", progress=False)
    assert again.best_trial.number == result.best_trial.number
    return result, measured


def test_the_decode_time_is_measured_once_and_stored(floored):
    result, measured = floored
    assert measured == ["llama.cpp"] or measured == ["torch"]  # once, for two runs on the study
    assert DecodeTime.from_dict(result.study.user_attrs[StudyKey.DECODE_TIME]).per_layer == pytest.approx(1.0)


def test_every_searched_trial_drops_the_layers_the_floor_needs(floored):
    result, _ = floored
    searched = [t for t in result.study.trials if TrialKey.BASELINE not in t.user_attrs]
    assert searched and all(1 <= len(t.user_attrs[TrialKey.DROPPED_LAYERS]) <= 2 for t in searched)
    assert all(t.user_attrs[TrialKey.SPEEDUP] >= 1.3 for t in searched)


def test_baselines_are_scored_but_never_chosen_below_the_floor(floored):
    result, _ = floored
    baselines = [t for t in result.study.trials if TrialKey.BASELINE in t.user_attrs]
    assert baselines and all(t.user_attrs[TrialKey.SPEEDUP] == pytest.approx(1.0) for t in baselines)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in baselines)
    assert TrialKey.BASELINE not in result.best_trial.user_attrs
    assert result.best_trial.user_attrs[TrialKey.SPEEDUP] >= 1.3
    assert result.model_dir is not None


def test_the_report_states_the_floor_and_the_prediction(floored):
    result, _ = floored
    text = report_markdown(result.study)
    assert "Speed-up floor" in text and "at least 1.3x" in text and "synthetic" in text
    assert f"{result.best_trial.user_attrs[TrialKey.SPEEDUP]:.2f}x" in text


def test_a_searched_trial_below_the_floor_stops_before_validation(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(speed_module, "measure_decode_time", lambda *a: synthetic(0.0, 1.0, 0.0, weights=10**6))
    space = SearchSpace(subset_size=(2, 8), n_clusters=3, fixed={"drop_layers": 0})  # never deep enough
    job = tiny_job(trials=2, target=0.2, min_speedup=1.3, baselines=("flap",), space=space, start="random")
    result = run_search(job, f"sqlite:///{tmp_path / 'runs.db'}", "below", session=tiny_session(tiny_tokenizer),
                        out_dir=tmp_path / "out", artifact_dir=tmp_path / "artifacts", progress=False)
    searched = [t for t in result.study.trials if TrialKey.BASELINE not in t.user_attrs]
    assert [t.state for t in searched] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(not t.intermediate_values for t in searched)  # no validation window scored
    assert result.best_trial is None and result.model_dir is None  # nothing meets it: nothing exported
    assert "no trial met it" in report_markdown(result.study)


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.0, 0.5, -2.0, float("nan"), float("inf"), True, "2"])
def test_a_floor_must_be_a_number_above_one(value):
    with pytest.raises(AdaPrunerError, match="min_speedup must be a number above 1"):
        SearchJob(min_speedup=value)


def test_a_floor_is_part_of_the_jobs_identity():
    assert SearchJob(min_speedup=1.5).identity() != SearchJob().identity()
    assert SearchJob.from_dict(SearchJob(min_speedup=1.5).to_dict()).min_speedup == 1.5


def test_a_plan_dropping_layers_is_predicted_faster():
    structure = model_structure(make_tiny_model())
    fit = synthetic(0.0, 1.0, 0.0, weights=10**6)
    keep = PruningPlan.keep_all(structure)
    dropped = PruningPlan(keep.layers, 1, structure.total_params, (1,))
    assert fit.speedup_of(structure, keep) == pytest.approx(1.0)
    assert fit.speedup_of(structure, dropped) == pytest.approx(4 / 3)
    narrow = PruningPlan(tuple(LayerPlan(lp.keep_groups[:1], lp.keep_channels) for lp in keep.layers), 1,
                         structure.total_params)
    assert fit.speedup_of(structure, narrow) == pytest.approx(1.0)  # width alone buys nothing under this model


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_runs_behind_the_floor(name):
    study = optuna.create_study(pruner=make_pruner(name, 8, min_speedup=1.5))
    for number, (value, speedup) in enumerate([(10.0, 1.0), (40.0, 1.6), (30.0, 1.7), (35.0, 1.8), (50.0, 1.9)]):
        study.add_trial(frozen(number, value, speedup))
    trial = study.ask()
    for step in range(8):
        trial.report(100.0 + step, step)
        trial.should_prune()  # answers, whatever it answers
    assert isinstance(study.pruner, FloorPruner)
