"""Depth in the search: the number of layers dropped as a searched (or fixed) dimension of the allocation."""

import optuna
import pytest
import torch
from helpers import make_tiny_model
from test_search import SPACE, tiny_job, tiny_session

from adapruner.export import load_pruned
from adapruner.search import SearchSpace, cluster_pool, run_search, suggest_config
from adapruner.search.objective import max_drop_layers
from adapruner.structure import model_structure

PARAMS = {"calib_size": 5, "calib_c0": 1.0, "calib_c1": 0.0, "calib_c2": 0.5, "aggregation": "max",
          "layer_first": 1, "layer_last": 1, "strength": 0.3, "attn_share": 0.2, "repair": "off", "ridge": 0.05,
          "scope": "layer", "score": "mixture", "iterations": 1, **{f"w_{m}": 0.5 for m in SPACE.metrics}}


def suggest(space, params, max_drop=None):
    clusters = cluster_pool(torch.randn(16, 4), space.n_clusters, seed=0)
    return suggest_config(optuna.trial.FixedTrial(params), space, clusters, n_layers=8, max_drop=max_drop)


def test_a_width_only_space_drops_no_layer():
    assert suggest(SPACE, PARAMS).allocation.drop_layers == 0


def test_the_default_space_searches_depth():
    assert SearchSpace().depth
    default = SearchSpace(subset_size=(2, 8), n_clusters=3)
    assert suggest(default, {**PARAMS, "drop_layers": 1}).allocation.drop_layers == 1


def test_a_depth_space_takes_the_suggested_drop():
    depth = SearchSpace(subset_size=(2, 8), n_clusters=3, depth=True)
    assert suggest(depth, {**PARAMS, "drop_layers": 2}).allocation.drop_layers == 2


def test_the_drop_is_searched_up_to_a_quarter_of_the_layers():
    depth = SearchSpace(subset_size=(2, 8), n_clusters=3, depth=True)
    study = optuna.create_study()
    trial = study.ask()
    suggest_config(trial, depth, cluster_pool(torch.randn(16, 4), 3, seed=0), n_layers=8)
    assert study.trials[0].distributions["drop_layers"] == optuna.distributions.IntDistribution(0, 2)


def test_the_drop_is_searched_only_as_far_as_the_target_pays():
    depth = SearchSpace(subset_size=(2, 8), n_clusters=3, depth=True)
    study = optuna.create_study()
    trial = study.ask()
    suggest_config(trial, depth, cluster_pool(torch.randn(16, 4), 3, seed=0), n_layers=8, max_drop=1)
    assert study.trials[0].distributions["drop_layers"].high == 1


def test_a_fixed_drop_applies_without_the_depth_flag():
    fixed = SearchSpace(subset_size=(2, 8), n_clusters=3, fixed={"drop_layers": 1})
    assert suggest(fixed, PARAMS).allocation.drop_layers == 1


def test_a_fixed_drop_of_every_layer_is_refused():
    with pytest.raises(Exception, match="drop every layer"):
        SearchSpace(fixed={"drop_layers": 4}).check_layers(4)


@pytest.mark.parametrize(("ratio", "layers"), [(0.1, 0), (0.2, 1), (0.45, 2)])
def test_the_most_layers_a_target_pays_for(ratio, layers):
    structure = model_structure(make_tiny_model())  # 4 layers of ~31k parameters, ~164k in all
    assert max_drop_layers(structure, ratio) == layers


@pytest.fixture(scope="module")
def deep(tiny_tokenizer, tmp_path_factory):
    """A tiny search that drops one of the four layers in every trial."""
    folder = tmp_path_factory.mktemp("deep")
    space = SearchSpace(subset_size=(2, 8), n_clusters=3, fixed={"drop_layers": 1})
    job = tiny_job(trials=3, baselines=(), space=space)
    return run_search(job, f"sqlite:///{folder / 'runs.db'}", "d", session=tiny_session(tiny_tokenizer),
                      out_dir=folder / "out", artifact_dir=folder / "artifacts", progress=False)


def test_trials_record_the_layers_they_dropped(deep):
    assert [len(t.user_attrs["dropped_layers"]) for t in deep.study.trials] == [1, 1, 1]


def test_trials_still_meet_the_ratio(deep):
    assert [round(t.user_attrs["removed_share"], 2) for t in deep.study.trials] == [0.2, 0.2, 0.2]


def test_the_exported_best_has_the_best_trials_depth(deep):
    model, _ = load_pruned(deep.model_dir)
    assert model.config.adapruner["dropped_layers"] == deep.best_trial.user_attrs["dropped_layers"]
