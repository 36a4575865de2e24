"""Several targets in one job: one study per target on one session, and the trade-off report."""

import pytest
from test_search import tiny_job, tiny_session

import adapruner.session
from adapruner.export import load_pruned
from adapruner.search import run_targets, target_study_name, write_tradeoff_report
from adapruner.search.targets import tradeoff_points


@pytest.fixture(scope="module")
def targets(tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("targets")
    session = tiny_session(tiny_tokenizer)
    calls = []
    collect = adapruner.session.collect_statistics
    patch = pytest.MonkeyPatch()
    patch.setattr(adapruner.session, "collect_statistics", lambda *a, **k: calls.append(1) or collect(*a, **k))
    try:
        job = tiny_job(trials=3, baselines=("llm-pruner",), baseline_draws=1, measure_cost=True)
        results = run_targets(job, (0.1, 0.3),
                              f"sqlite:///{folder / 'runs.db'}", "multi", session=session, out_dir=folder / "out",
                              artifact_dir=folder / "artifacts", progress=False)
    finally:
        patch.undo()
    return results, folder, calls


def test_a_single_target_keeps_the_jobs_study_name():
    assert target_study_name("job-1", 0.2, several=False) == "job-1"


def test_each_of_several_targets_has_its_own_study(targets):
    results, _, _ = targets
    assert [r.study.study_name for r in results] == ["multi-r0.1", "multi-r0.3"]


def test_each_target_is_searched_at_its_ratio(targets):
    results, _, _ = targets
    assert [round(r.best_trial.user_attrs["removed_share"], 1) for r in results] == [0.1, 0.3]


def test_the_pool_statistics_are_computed_once_for_all_targets(targets):
    _, _, calls = targets
    assert len(calls) == 1


def test_each_target_exports_its_model_in_its_folder(targets):
    results, folder, _ = targets
    model, _ = load_pruned(folder / "out" / "r0.3" / "model")
    assert model.config.adapruner["trial"] == results[1].best_trial.number


def test_the_tradeoff_has_the_unpruned_model_then_best_and_llm_pruner_per_target(targets):
    results, _, _ = targets
    rows = tradeoff_points([r.study for r in results])
    assert [(r["target"], r["model"]) for r in rows] == [(0.0, "unpruned"), (0.1, "best"), (0.1, "llm-pruner"),
                                                         (0.3, "best"), (0.3, "llm-pruner")]


def test_a_larger_target_keeps_fewer_parameters(targets):
    results, _, _ = targets
    rows = [r for r in tradeoff_points([r.study for r in results]) if r["model"] == "llm-pruner"]
    assert rows[0]["params"] > rows[1]["params"]


def test_the_tradeoff_shows_measured_decode_speed(targets):
    results, _, _ = targets
    assert all(r["decode"] > 0 for r in tradeoff_points([r.study for r in results]))


def test_the_tradeoff_report_draws_the_curve(targets, tmp_path):
    results, _, _ = targets
    report = write_tradeoff_report([r.study for r in results], tmp_path)
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert "![trade-off](tradeoff.png)" in report.read_text()
