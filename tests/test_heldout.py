"""Out-of-domain test: held-out sources are scored at test, never validated on, and reported apart."""

import math

import pytest
from helpers import make_documents, make_tiny_model

from adapruner.data import build_pool, check_heldout, default_heldout, split_documents
from adapruner.errors import AdaPrunerError
from adapruner.search import SearchJob, SearchSpace, run_search
from adapruner.search.best import best_trial
from adapruner.search.objective import paired_estimate, source_weights, weighted_mean
from adapruner.search.report import baseline_trials, report_markdown
from adapruner.session import PruningSession


@pytest.fixture(scope="module")
def two_domain_session(tiny_tokenizer):
    """Validation mixes two sources of unequal size; a third is held out."""
    big = split_documents("big", make_documents(60, 150, seed=1))
    small = split_documents("small", make_documents(30, 150, seed=2))
    other = split_documents("other", make_documents(30, 150, seed=3))
    pool = build_pool(tiny_tokenizer, [(big, 8), (small, 8)], seq_len=32)
    return PruningSession(make_tiny_model(), tiny_tokenizer, pool, [big, small], heldout_sources=[other],
                          max_eval_windows={"validation": None, "test": 6}, progress=False, cache_statistics=False)


@pytest.fixture(scope="module")
def heldout_study(two_domain_session, tmp_path_factory):
    job = SearchJob(model="tiny", calibration=("big", "small"), trials=6, pool_size=16, seq_len=32,
                    val_windows=12, test_windows=6, space=SearchSpace(subset_size=(2, 8), n_clusters=3),
                    baselines=("llm-pruner", "flap"), baseline_draws=2, measure_cost=False)
    return run_search(job, None, "heldout", session=two_domain_session, progress=False,
                      artifact_dir=tmp_path_factory.mktemp("artifacts")).study


def test_default_heldout_is_the_unused_builtin_sources():
    assert default_heldout(["builtin:books", "builtin:wiki:10"]) == ("builtin:news",)


def test_default_heldout_fetches_nothing_for_a_job_on_its_own_texts():
    assert default_heldout(["my-notes.txt"]) == ()


def test_a_heldout_source_that_also_validates_is_refused():
    with pytest.raises(AdaPrunerError, match="held-out source 'builtin:wiki'"):
        check_heldout(["builtin:books:10", "builtin:wiki"], ["builtin:wiki"])


def test_no_heldout_when_asked_for_none():
    assert check_heldout(["builtin:books"], []) == ()


def test_source_weights_give_each_source_half_the_mean():
    weights = source_weights(["a", "a", "a", "b"])
    assert weighted_mean({0: 1.0, 1: 1.0, 2: 1.0, 3: 3.0}, weights) == pytest.approx(2.0)


def test_paired_estimate_weights_the_best_trials_windows():
    weights = source_weights(["a", "a", "a", "b"])
    best = {0: 1.0, 1: 1.0, 2: 1.0, 3: 3.0}  # per-source mean 2.0; plain mean 1.5
    assert paired_estimate({3: 3.5}, best, math.exp(2.0), weights) == pytest.approx(math.exp(2.5))


def test_validation_is_the_per_source_mean_of_log_perplexity(two_domain_session, heldout_study):
    sources = two_domain_session.window_sources("validation")
    assert sources.count("big") != sources.count("small"), "equal counts would prove nothing"
    trial = heldout_study.best_trial
    losses = {i: math.log(v) for i, v in trial.intermediate_values.items()}  # per-window perplexity
    by_source = {name: [losses[i] for i, s in enumerate(sources) if s == name] for name in ("big", "small")}
    expected = math.exp(sum(sum(v) / len(v) for v in by_source.values()) / 2)
    assert trial.value == pytest.approx(expected, rel=1e-9)


def test_baselines_and_the_best_are_tested_on_the_heldout_source(heldout_study):
    for trial in [*baseline_trials(heldout_study).values(), heldout_study.best_trial]:
        assert set(trial.user_attrs["heldout_ppl_by_source"]) == {"other"}


def test_heldout_perplexity_is_the_heldout_sources_own(heldout_study):
    trial = heldout_study.best_trial
    assert trial.user_attrs["heldout_ppl"] == pytest.approx(trial.user_attrs["heldout_ppl_by_source"]["other"])


def test_in_domain_test_covers_each_evaluation_source(heldout_study):
    assert set(heldout_study.best_trial.user_attrs["test_ppl_by_source"]) == {"big", "small"}


def test_the_unpruned_model_is_scored_on_the_heldout_source(heldout_study):
    assert heldout_study.user_attrs["unpruned"]["heldout"] > 1


def test_the_unpruned_models_in_domain_test_is_recorded_per_source(heldout_study):
    unpruned = heldout_study.user_attrs["unpruned"]
    assert set(unpruned["test_by_source"]) == {"big", "small"}
    assert unpruned["test"] == pytest.approx(math.prod(unpruned["test_by_source"].values()) ** 0.5, rel=1e-9)


def test_the_report_shows_heldout_beside_in_domain_test(heldout_study):
    report = report_markdown(heldout_study)
    assert "| configuration | validation | test (in-domain) | held-out test | parameters kept |" in report


def test_the_report_margin_is_the_out_of_domain_one(heldout_study):
    best, reference = best_trial(heldout_study), baseline_trials(heldout_study)["llm-pruner"]
    draws = reference.user_attrs["draws"]
    mean = sum(d["heldout_ppl"] for d in draws) / len(draws)  # against the mean of its calibration draws
    ratio = best.user_attrs["heldout_ppl"] / mean
    assert f"Held-out test perplexity {ratio:.2f}x LLM-Pruner's default (the mean of its {len(draws)} calibration " \
           "draws" in report_markdown(heldout_study)


def test_a_job_whose_heldout_source_calibrates_is_refused():
    with pytest.raises(AdaPrunerError, match="held-out source"):
        SearchJob(calibration=("builtin:books", "builtin:wiki"), heldout=("builtin:wiki",))
