"""A search's first trials: LLM-Pruner's and FLAP's configurations, the shipped priors, earlier studies."""

import json
from importlib import resources

import optuna
import pytest
from test_search import tiny_job, tiny_session

from adapruner.data import BUILTIN_SOURCES
from adapruner.search import SearchJob, run_search
from adapruner.search import start as start_module
from adapruner.search.space import cluster_pool
from adapruner.search.start import (
    fit_to_space,
    informed_params,
    own_subset,
    prior_params,
    rule_ridge,
    search_domains,
    unseen_sources,
)


@pytest.fixture
def session(tiny_tokenizer):
    return tiny_session(tiny_tokenizer)


@pytest.fixture
def clusters(session):
    return cluster_pool(session.statistics.embedding, 3, 0)


PRIORS = {"derivation": "test", "priors": [
    {"params": {"aggregation": "max", "strength": 0.7, "layer_first": 9}, "seen": ["builtin:books", "builtin:wiki"]},
    {"params": {"aggregation": "mean", "strength": 0.2}, "seen": ["builtin:news", "builtin:wiki"]},
]}


@pytest.fixture
def priors(monkeypatch):
    monkeypatch.setattr(start_module, "shipped_priors", lambda: PRIORS)


def test_the_shipped_priors_say_how_they_were_derived_and_fit_the_default_space(session):
    shipped = json.loads(resources.files("adapruner.search").joinpath("priors.json").read_text())
    assert shipped["derivation"].startswith("python bench/priors.py")
    assert shipped["priors"]
    builtin = {f"builtin:{name}" for name in BUILTIN_SOURCES}
    job = SearchJob()  # the default space, on SmolLM2-135M's 30 layers, able to drop 4
    domains = search_domains(job, cluster_pool(session.statistics.embedding, job.space.n_clusters, 0), 30, 4)
    for prior in shipped["priors"]:
        assert set(prior["seen"]) < builtin, prior["seen"]  # each leaves a built-in source unseen
        # nothing clamped, nothing dropped (the subset's size is bounded by the pool, the tiny one's here)
        params = {k: v for k, v in prior["params"].items() if k != "calib_size"}
        assert fit_to_space(params, domains) == params
        assert 1 <= prior["params"]["calib_size"] <= job.pool_size
    left_out = {source: [p for p in shipped["priors"] if source not in p["seen"]] for source in builtin}
    assert all(left_out.values()), "every built-in source left out has priors that never saw it"


def test_params_are_fitted_to_the_space(session, clusters):
    domains = search_domains(tiny_job(), clusters, n_layers=4, max_drop=0)
    fitted = fit_to_space({"layer_first": 9, "strength": 3.0, "aggregation": "median", "unknown": 1,
                           "calib_size": 2.6, "repair": "bias"}, domains)
    assert fitted == {"layer_first": 1, "strength": 1.0, "calib_size": 3, "repair": "bias"}  # clamped, dropped


def test_a_prior_that_saw_a_heldout_source_is_never_used(priors):
    job = SearchJob(calibration=("builtin:books", "builtin:wiki"))  # holds out news
    assert unseen_sources(job) == {"builtin:news"}
    assert prior_params(job) == [PRIORS["priors"][0]["params"]]
    assert prior_params(SearchJob(calibration=("builtin:wiki", "builtin:news"))) == [PRIORS["priors"][1]["params"]]
    assert prior_params(SearchJob(calibration=("builtin:books", "builtin:news"))) == []  # wiki held out: both saw it
    assert len(prior_params(SearchJob(calibration=("builtin:wiki", "builtin:news"), heldout=()))) == 2


def test_the_informed_start_is_peers_then_priors_then_nothing_random(session, clusters, priors):
    job = tiny_job(calibration=("builtin:books", "builtin:wiki"), heldout=("builtin:news",))
    params = informed_params(job, session, clusters, max_drop=0)
    assert len(params) == 5
    assert params[0]["w_taylor_first_persample"] == 1.0 and params[1]["scope"] == "global"
    assert params[1]["score"] == "flap" and params[1]["repair"] == "bias"
    for plain, repaired in zip(params[:2], params[2:4], strict=True):  # then each with the pool repair
        assert repaired == {**plain, "repair": "pool", "ridge": repaired["ridge"]}
    ridge = rule_ridge(job, session.structure)  # the widest projection's k / T: 96 channels, 256×32 tokens×2 sources
    assert ridge == pytest.approx(96 / (256 * 32 * 2))
    assert params[2]["ridge"] == max(ridge, job.space.ridge[0])  # clamped into the space's range
    assert params[4] == {"aggregation": "max", "strength": 0.7, "layer_first": 1}  # the prior, clamped
    assert informed_params(tiny_job(start="random"), session, clusters, max_drop=0) == []
    assert len(informed_params(tiny_job(trials=1), session, clusters, max_drop=0)) == 1  # never past the budget


def test_a_warm_start_takes_earlier_studies_that_never_saw_the_heldout_source(session, tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    storage = optuna.storages.RDBStorage(url)
    first = run_search(tiny_job(trials=4, baselines=(), start="random"), url, "first", session=session,
                       progress=False, artifact_dir=tmp_path / "a").study  # its choice is none of the peers
    chosen = first.trials[first.user_attrs["selection"]["chosen"]]
    # a study that saw "other", a source the next job holds out
    saw = SearchJob.from_dict({**json.loads(json.dumps(tiny_job(trials=3, baselines=()).to_dict())),
                               "calibration": ["toy", "other"]})
    seen = optuna.create_study(storage=storage, study_name="saw-other")
    seen.set_user_attr("job", saw.to_dict())
    seen.set_user_attr("selection", {"chosen": 0, "finalists": [{"trial": 0, "selection_ppl": 1.0}], "scores": {}})
    seen.add_trial(optuna.trial.create_trial(params={"strength": 0.123},
                                             distributions={"strength": optuna.distributions.FloatDistribution(0, 1)},
                                             value=1.0))
    job = tiny_job(trials=6, baselines=(), start="warm", heldout=("other",))
    clusters = cluster_pool(session.statistics.embedding, 3, 0)
    params = informed_params(job, session, clusters, max_drop=0, storage=storage, study_name="next")
    assert len(params) == 5  # four peers, then the first study's choice; never the one that saw "other"
    subset = {k for k in chosen.params if k.startswith("calib_c")}
    assert subset and any(chosen.params[k] != 1.0 for k in subset)  # its own cluster weights ...
    assert params[4] == {**chosen.params, **dict.fromkeys(subset, 1.0)}  # ... become this pool's even ones
    assert all(p.get("strength") != 0.123 for p in params)


def test_a_transferred_configuration_takes_this_jobs_subset_and_keeps_its_size(session, clusters, monkeypatch):
    """A prior's cluster weights name clusters of another seed's pool: it starts from this pool's even subset."""
    theirs = {"calib_size": 5, "calib_seed": 77, "calib_c0": 0.9, "calib_c1": 0.0, "calib_c2": 0.05, "calib_c7": 0.3,
              "strength": 0.4}
    monkeypatch.setattr(start_module, "shipped_priors", lambda: {"priors": [{"params": theirs, "seen": ["toy"]}]})
    job = tiny_job(seed=3, heldout=("other",))
    assert own_subset(theirs, job, 3) == {"calib_size": 5, "strength": 0.4, "calib_seed": 3, "calib_c0": 1.0,
                                          "calib_c1": 1.0, "calib_c2": 1.0}
    assert own_subset({"strength": 0.4}, job, 3) == {"strength": 0.4}  # nothing of a subset: nothing added
    prior = informed_params(job, session, clusters, max_drop=0)[4]
    assert prior == {"calib_size": 5, "strength": 0.4, "calib_c0": 1.0, "calib_c1": 1.0, "calib_c2": 1.0}
    assert prior["calib_size"] != informed_params(job, session, clusters, max_drop=0)[1]["calib_size"]  # not FLAP's


def test_a_study_queues_its_informed_start_once(session, tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    job = tiny_job(trials=4, baselines=())
    run_search(job, url, "s", session=session, progress=False, artifact_dir=tmp_path / "a")
    study = run_search(tiny_job(trials=6, baselines=()), url, "s", session=session, progress=False,
                       artifact_dir=tmp_path / "a").study
    assert study.user_attrs["informed_start"] == 4  # the four peers, no more than the first budget
    searched = [t for t in study.trials if "baseline" not in t.user_attrs]
    assert [t.params for t in searched].count(searched[1].params) == 1  # FLAP's, queued once
