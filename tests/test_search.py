"""The search on the tiny model: space encoding, study handling, budgets, resume, failures, report."""

import math
import tarfile
from dataclasses import replace

import optuna
import pytest
import torch
from helpers import make_documents, make_tiny_model
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from adapruner.data import build_pool, split_documents
from adapruner.errors import AdaPrunerError
from adapruner.export import load_pruned
from adapruner.repair import Repair
from adapruner.search import (
    DEFAULT_BASELINES,
    SearchJob,
    SearchSpace,
    baseline_trials,
    cluster_pool,
    create_study,
    fail_dead_trials,
    make_pruner,
    make_sampler,
    make_storage,
    run_search,
    suggest_config,
)
from adapruner.search.report import best_so_far, write_report
from adapruner.search.samplers import _make_sampler
from adapruner.search.space import allocate, subset_from_clusters
from adapruner.search.study import BASELINE_ATTEMPTS, requeue_failed_baselines
from adapruner.session import PruningSession

SPACE = SearchSpace(subset_size=(2, 8), n_clusters=3, depth=False)  # width only: the tests of depth have their own


def tiny_job(**overrides):
    """A search of the tiny model; the speed measurement only where a test reads it (it costs seconds)."""
    base = dict(model="tiny", calibration=("toy",), trials=8, pool_size=16, seq_len=32, val_windows=12,
                test_windows=6, space=SPACE, measure_cost=False, baseline_draws=2, selection_windows=6)
    return SearchJob(**{**base, **overrides})


def tiny_session(tokenizer) -> PruningSession:
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tokenizer, [(source, 16)], seq_len=32)
    return PruningSession(make_tiny_model(), tokenizer, pool, [source],
                          max_eval_windows={"validation": 12, "test": 6, "selection": 18}, progress=False,
                          cache_statistics=False)


@pytest.fixture
def session(tiny_tokenizer):
    return tiny_session(tiny_tokenizer)


# -- the space ----------------------------------------------------------------------------------


def test_allocate_is_proportional_and_capped():
    assert allocate(10, [1, 1, 0], [8, 8, 8]) == [5, 5, 0]
    assert allocate(10, [1, 0, 0], [4, 8, 8]) == [4, 3, 3]  # overflow spreads to the others
    assert sum(allocate(7, [0.2, 0.5, 0.3], [3, 3, 3])) == 7
    assert allocate(30, [1, 1, 1], [3, 3, 3]) == [3, 3, 3]  # never more than the pool
    assert allocate(4, [0, 0, 0], [5, 5, 5]) in ([2, 1, 1], [1, 2, 1], [1, 1, 2])


def test_clusters_cover_the_pool_nearest_first():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 5
    points = torch.cat([centres[i] + 0.1 * torch.randn(6, 8) for i in range(3)])
    clusters = cluster_pool(points, 3, seed=1)
    assert sorted(i for m in clusters.members for i in m) == list(range(18))
    assert sorted(sorted(m) for m in clusters.members) == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    assert cluster_pool(points, 3, seed=1) == clusters
    subset = subset_from_clusters(clusters, [1.0, 0.0, 0.0], 4)
    assert len(subset) == 4
    assert set(subset) <= set(clusters.members[0])
    assert subset == tuple(sorted(clusters.members[0][:4]))


def suggest(space, params):
    trial = optuna.trial.FixedTrial(params)
    clusters = cluster_pool(torch.randn(16, 4), space.n_clusters, seed=0)
    return suggest_config(trial, space, clusters, n_layers=8)


def test_suggest_builds_a_config_and_respects_fixed_params():
    params = {"calib_size": 5, "calib_c0": 1.0, "calib_c1": 0.0, "calib_c2": 0.5, "aggregation": "max",
              "layer_first": 1, "layer_last": 1, "strength": 0.3, "attn_share": 0.2, "repair": "pool", "ridge": 0.05,
              "scope": "layer", "score": "mixture", "iterations": 1, **{f"w_{m}": 0.5 for m in SPACE.metrics}}
    config = suggest(SPACE, params)
    assert len(config.subset) == 5
    assert config.mixture.aggregation == "max"
    assert (config.allocation.first, config.allocation.last, config.allocation.attn_share) == (1, -1, 0.2)
    assert config.allocation.scope == "layer"
    assert suggest(SPACE, {**params, "scope": "global"}).allocation.scope == "global"
    flap = suggest(SPACE, {**params, "score": "flap"})
    assert dict(flap.mixture.weights) == {"flap": 1.0}  # FLAP's score instead of the mixture, not mixed into it
    fixed = SearchSpace(subset_size=(2, 8), n_clusters=3, metrics=("wanda_sp",), subset_mode="all",
                        fixed={"aggregation": "sum", "strength": 0.0, "layer_first": 0, "layer_last": 0,
                               "attn_share": 0.1, "repair": "off", "scope": "layer", "score": "mixture",
                               "drop_layers": 0})
    config = suggest(fixed, {})  # nothing left to search: a FixedTrial with no params works
    assert config.subset == tuple(range(16))
    assert dict(config.mixture.weights) == {"wanda_sp": 1.0}
    random_mode = SearchSpace(subset_size=(2, 8), subset_mode="random", depth=False)
    a = suggest(random_mode, {**params, "calib_seed": 3})
    assert a.subset == suggest(random_mode, {**params, "calib_seed": 3}).subset
    assert len(a.subset) == 5


def test_the_repair_and_its_ridge_are_searched_or_fixed():
    params = {"calib_size": 5, "calib_c0": 1.0, "calib_c1": 0.0, "calib_c2": 0.5, "aggregation": "max",
              "layer_first": 1, "layer_last": 1, "strength": 0.3, "attn_share": 0.2, "repair": "pool", "ridge": 0.05,
              "scope": "layer", "score": "mixture", "iterations": 1, **{f"w_{m}": 0.5 for m in SPACE.metrics}}
    assert suggest(SPACE, params).repair == Repair("pool", 0.05)
    assert suggest(SPACE, {**params, "repair": "bias"}).repair.mode == "bias"
    flap_only = SearchSpace(subset_size=(2, 8), n_clusters=3, fixed={"repair": "bias"}, depth=False)
    assert suggest(flap_only, {k: v for k, v in params.items() if k not in ("repair", "ridge")}).repair.mode == "bias"
    fixed = SearchSpace(subset_size=(2, 8), n_clusters=3, fixed={"repair": "off"}, depth=False)
    assert suggest(fixed, {k: v for k, v in params.items() if k != "repair"}).repair.mode == "off"
    never = SearchSpace(subset_size=(2, 8), n_clusters=3, repairs=("off",), depth=False)
    config = suggest(never, {k: v for k, v in params.items() if k not in ("repair", "ridge")})
    assert config.repair == Repair()


def test_the_repair_space_is_checked():
    with pytest.raises(AdaPrunerError, match="repair mode 'bogus'"):
        SearchSpace(repairs=("off", "bogus"))
    with pytest.raises(AdaPrunerError, match="ridge"):
        SearchSpace(ridge=(0.0, 1.0))
    with pytest.raises(AdaPrunerError, match="ridge"):
        Repair("pool", float("nan"))


def test_bad_jobs_are_refused():
    with pytest.raises(AdaPrunerError, match="target"):
        tiny_job(target=1.5)
    with pytest.raises(AdaPrunerError, match="sampler"):
        tiny_job(sampler="cmaes")
    with pytest.raises(AdaPrunerError, match="baseline"):
        tiny_job(baselines=("sparsegpt",))
    with pytest.raises(AdaPrunerError, match="trials"):
        tiny_job(trials=0)
    with pytest.raises(AdaPrunerError, match="metric"):
        SearchSpace(metrics=("l0",))
    assert SearchJob.from_dict(tiny_job().to_dict()) == tiny_job()


def test_a_job_takes_a_parameter_count_as_its_ratio():
    assert tiny_job(target=28021248).target == 28021248


def test_a_counted_ratio_survives_the_stored_job():
    assert SearchJob.from_dict(tiny_job(target=28021248).to_dict()).target == 28021248


@pytest.mark.parametrize("ratio", [1.5, 0, 0.0, -3, 1.0, 28021248.0, True, float("nan"), float("inf")])
def test_a_ratio_neither_a_fraction_nor_a_count_is_refused(ratio):
    with pytest.raises(AdaPrunerError, match=r"target must be a fraction in \(0, 1\) or a whole parameter count >= 1"):
        tiny_job(target=ratio)


# -- the study ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tiny_tokenizer, tmp_path_factory):
    """One search of the tiny model to its end (exported, its artifact stored), read by the tests below."""
    folder = tmp_path_factory.mktemp("search")
    result = run_search(tiny_job(measure_cost=True), f"sqlite:///{folder / 'runs.db'}", "s",
                        session=tiny_session(tiny_tokenizer),
                        out_dir=folder / "out", artifact_dir=folder / "artifacts", progress=False)
    return result, folder


BASELINE_RUNS = [("llm-pruner", 0), ("llm-pruner+repair", 0), ("llm-pruner", 1), ("llm-pruner+repair", 1),
                 ("flap", 0), ("wanda-sp", 0)]


def test_the_baselines_run_first_each_draw_its_own_trial(searched):
    result, _ = searched
    runs = [(t.user_attrs.get("baseline"), t.user_attrs.get("draw")) for t in result.study.trials[:6]]
    assert sorted(runs) == sorted(BASELINE_RUNS)


def test_the_draws_calibrate_on_different_samples(searched):
    result, _ = searched
    subsets = {t.user_attrs["draw"]: t.user_attrs["config"]["subset"] for t in result.study.trials[:6]
               if t.user_attrs["baseline"] == "llm-pruner"}
    assert len(subsets[0]) == len(subsets[1]) and subsets[0] != subsets[1]


def test_the_search_finishes_its_budget_besides_the_baselines(searched):
    result, _ = searched
    finished = [t for t in result.study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len([t for t in finished if "baseline" not in t.user_attrs]) == 8
    assert len(finished) == 8 + len(BASELINE_RUNS)


def test_the_search_starts_from_llm_pruners_and_flaps_configurations(searched):
    result, _ = searched
    first = [t for t in result.study.trials if "baseline" not in t.user_attrs][:4]
    assert first[0].params["w_taylor_first_persample"] == 1.0 and first[0].params["repair"] == "off"
    assert first[0].params["layer_first"] == 1  # LLM-Pruner's 4 of 32 layers, a quarter of the tiny model's 4
    assert first[1].params["score"] == "flap" and first[1].params["scope"] == "global"
    assert first[1].params["repair"] == "bias"
    assert [t.params["repair"] for t in first[2:]] == ["pool", "pool"]  # then both with the pool repair
    assert result.study.user_attrs["informed_start"] == 4  # no priors for a model's own texts, no earlier study


def test_baselines_are_never_stopped_early(searched):
    result, _ = searched
    assert [(t.state, t.user_attrs["windows"]) for t in result.study.trials[:6]] == [(TrialState.COMPLETE, 12)] * 6


def test_baselines_are_tested(searched):
    result, _ = searched
    assert min(t.user_attrs["test_ppl"] for t in result.study.trials[:6]) > 1


def test_a_drawn_baseline_is_reported_by_the_mean_of_its_draws(searched, tmp_path):
    result, _ = searched
    draws = [t for t in result.study.trials[:6] if t.user_attrs["baseline"] == "llm-pruner"]
    expected = baseline_trials(result.study)["llm-pruner"]
    assert expected.user_attrs["test_ppl"] == pytest.approx(sum(t.user_attrs["test_ppl"] for t in draws) / 2)
    assert expected.value == pytest.approx(sum(t.value for t in draws) / 2)
    assert [d["trial"] for d in expected.user_attrs["draws"]] == sorted(t.number for t in draws)
    report = write_report(result.study, tmp_path).read_text()
    assert "baseline: llm-pruner (mean of 2 draws)" in report
    assert "`llm-pruner` over its 2 calibration draws" in report
    assert baseline_trials(result.study)["flap"].user_attrs.get("draws") is None


def test_the_finalists_are_rescored_and_the_best_there_is_chosen(searched):
    result, _ = searched
    record = result.study.user_attrs["selection"]
    complete = sorted((t for t in result.study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert [r["trial"] for r in record["finalists"]] == [t.number for t in complete[:4]]
    assert record["windows"] == {"toy": 18}
    chosen = min(record["finalists"], key=lambda r: r["selection_ppl"])
    assert record["chosen"] == chosen["trial"] == result.best_trial.number
    assert result.best_trial.user_attrs["selection_ppl"] == chosen["selection_ppl"]


def test_the_selection_tells_each_finalist_and_shows_one_bar_over_their_windows(searched, tiny_tokenizer, capsys):
    from dataclasses import replace as changed

    from adapruner.search.selection import select

    result, _ = searched
    steps = []
    session = changed(tiny_session(tiny_tokenizer), progress=True,
                      on_step=lambda name, done, total: steps.append((name, done, total)))
    job = SearchJob.from_dict(result.study.user_attrs["job"])
    record = select(session, job, result.study.trials, known={})
    assert [s for s in steps if s[0] == "selection"] == [("selection", i, job.finalists) for i in range(job.finalists)]
    assert [r["trial"] for r in record["finalists"]] == [r["trial"] for r in result.study.user_attrs["selection"][
        "finalists"]]
    bar = capsys.readouterr().err
    assert f"selection of {job.finalists} finalists:   0%|          | 0/{job.finalists * 18} " in bar


def test_the_best_is_tested(searched):
    result, _ = searched
    assert result.best_trial.user_attrs["test_ppl"] > 1


def test_the_best_meets_the_ratio(searched):
    result, _ = searched
    assert result.best_trial.user_attrs["removed_share"] == pytest.approx(0.2, abs=0.01)


def test_the_best_records_the_time_of_each_phase(searched):
    result, _ = searched
    assert set(result.best_trial.user_attrs["seconds"]) >= {"importance", "plan", "prune", "validation"}


def test_the_exported_model_is_the_best_trials(searched):
    result, _ = searched
    model, _ = load_pruned(result.model_dir)
    assert model.config.adapruner["trial"] == result.best_trial.number


def test_the_exported_model_has_the_best_trials_sizes(searched):
    result, _ = searched
    model, _ = load_pruned(result.model_dir)
    sizes = [[s["num_key_value_heads"], s["intermediate_size"]] for s in model.config.adapruner["layers"]]
    assert sizes == result.best_trial.user_attrs["sizes"]


def test_the_artifact_unpacks_to_the_exported_model(searched, tmp_path):
    result, folder = searched
    download_artifact(artifact_store=FileSystemArtifactStore(str(folder / "artifacts")),
                      artifact_id=result.artifact_id, file_path=str(tmp_path / "model.tar"))
    with tarfile.open(tmp_path / "model.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    again, _ = load_pruned(tmp_path / "unpacked" / "model")
    model, _ = load_pruned(result.model_dir)
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_study_names_the_artifact(searched):
    result, _ = searched
    assert result.study.user_attrs["best_model"]["artifact_id"] == result.artifact_id


@pytest.mark.parametrize("line", ["baseline: llm-pruner", "best: trial {best}", "## Cost"])
def test_the_report_shows_baselines_best_and_cost(searched, tmp_path, line):
    result, _ = searched
    report = write_report(result.study, tmp_path).read_text()
    assert line.format(best=result.best_trial.number) in report


def test_the_report_draws_the_best_so_far(searched, tmp_path):
    result, _ = searched
    write_report(result.study, tmp_path)
    assert (tmp_path / "best_so_far.png").stat().st_size > 1000


def test_the_best_so_far_never_rises(searched):
    result, _ = searched
    values = [point.val_ppl for point in best_so_far(result.study)]
    assert values == sorted(values, reverse=True)


def test_the_best_so_far_has_a_point_per_finished_trial(searched):
    result, _ = searched
    assert len(best_so_far(result.study)) == 8 + len(BASELINE_RUNS)


def test_the_unpruned_model_the_baselines_and_the_best_are_measured(searched):
    result, _ = searched
    assert list(result.study.user_attrs["inference_cost"]["models"]) == ["unpruned", *DEFAULT_BASELINES, "best"]


def test_a_measured_model_has_the_parameters_its_trial_kept(searched):
    result, _ = searched
    measured = result.study.user_attrs["inference_cost"]["models"]["best"]["parameters"]
    assert measured == result.best_trial.user_attrs["params_kept"]


def test_the_best_models_bytes_on_disk_are_its_exports(searched):
    result, _ = searched
    measured = result.study.user_attrs["inference_cost"]["models"]["best"]["disk_bytes"]
    assert measured == sum(f.stat().st_size for f in result.model_dir.glob("*.safetensors"))


def test_models_too_big_to_hold_at_once_are_measured_one_at_a_time(searched, tiny_tokenizer, monkeypatch):
    from adapruner.search import cost
    from adapruner.search.cost import cost_table, measure_models

    result, _ = searched
    study = optuna.create_study()  # the finished study's trials and job, without its measurement
    study.add_trials(result.study.trials)
    study.set_user_attr("job", result.study.user_attrs["job"])
    monkeypatch.setattr(cost, "fits_at_once", lambda model, n: False)
    job = tiny_job(measure_cost=True)
    summary = measure_models(study, tiny_session(tiny_tokenizer), job, prefill_shapes=((1, 8),), new_tokens=3,
                             repeats=1, warmup=0)
    assert list(summary["models"]) == ["unpruned", *job.baselines, "best"]
    assert "spread" not in summary and "rounds" not in summary
    assert "one model after another" in "\n".join(cost_table(summary))


def test_the_cost_is_measured_in_the_rounds_the_job_asks_for(searched, tiny_tokenizer, monkeypatch):
    from adapruner.search import cost
    from adapruner.search.cost import measure_models

    result, _ = searched
    study = optuna.create_study()
    study.add_trials(result.study.trials)
    study.set_user_attr("job", result.study.user_attrs["job"])
    in_llama_cpp = []
    monkeypatch.setattr(cost, "measure_in_llama_cpp", lambda *a, **k: in_llama_cpp.append(k["repeats"]))
    job = tiny_job(measure_cost=True, cost_rounds=2)
    summary = measure_models(study, tiny_session(tiny_tokenizer), job, prefill_shapes=((1, 8),), new_tokens=3,
                             warmup=0)
    assert summary["rounds"] == 2 and in_llama_cpp == [2]
    with pytest.raises(AdaPrunerError, match="cost_rounds must be positive"):
        tiny_job(cost_rounds=0)


def test_a_search_decodes_its_own_number_of_tokens_unless_told(searched, tiny_tokenizer, monkeypatch):
    from adapruner.search import cost
    from adapruner.search.cost import DECODE_TOKENS, measure_models

    result, _ = searched
    asked = []
    real = cost.measure_interleaved
    monkeypatch.setattr(cost, "measure_interleaved", lambda models, **kw: asked.append(kw["new_tokens"]) or real(
        models, **{**kw, "new_tokens": 3, "prefill_shapes": ((1, 8),), "repeats": 1, "warmup": 0}))
    monkeypatch.setattr(cost, "measure_in_llama_cpp", lambda *a, **k: None)
    for options in ({}, {"new_tokens": 5}):
        study = optuna.create_study()
        study.add_trials(result.study.trials)
        measure_models(study, tiny_session(tiny_tokenizer), tiny_job(measure_cost=True), **options)
    assert asked == [DECODE_TOKENS, 5] and DECODE_TOKENS == 64


def test_the_unpruned_model_is_the_speed_reference(searched):
    result, _ = searched
    assert result.study.user_attrs["inference_cost"]["speedups"]["unpruned"]["decode"] == 1.0
    cost = result.study.user_attrs["inference_cost"]
    assert cost["rounds"] == 5 and set(cost["spread"]) == set(cost["models"])  # interleaved, each ratio's range
    best = cost["spread"]["best"]["decode"]
    assert best["low"] <= best["median"] <= best["high"]
    assert best["noisy"] == (best["high"] - best["low"] > 0.1 * best["median"])


def test_the_report_shows_what_the_pruned_models_buy(searched, tmp_path):
    result, _ = searched
    assert "| best |" in write_report(result.study, tmp_path).read_text().split("What the pruned models buy")[1]


def test_a_job_may_skip_the_measurement(session, tmp_path):
    job = tiny_job(trials=1, baselines=("magnitude",), measure_cost=False)
    study = run_search(job, None, "quiet", session=session, progress=False, artifact_dir=tmp_path).study
    assert "inference_cost" not in study.user_attrs


@pytest.fixture(scope="module")
def with_tasks(tiny_tokenizer, tmp_path_factory):
    """A short search that scores the built-in tasks (2 items each) after it."""
    folder = tmp_path_factory.mktemp("tasks")
    job = tiny_job(trials=3, baselines=("magnitude",), tasks=("books-cloze", "books-lastword"), task_limit=2)
    return run_search(job, f"sqlite:///{folder / 'runs.db'}", "t", session=tiny_session(tiny_tokenizer),
                      artifact_dir=folder / "artifacts", progress=False).study


def test_the_tasks_score_the_unpruned_model_the_baselines_and_the_best(with_tasks):
    assert list(with_tasks.user_attrs["tasks"]["models"]) == ["unpruned", "magnitude", "best"]


def test_each_model_has_an_accuracy_per_task(with_tasks):
    models = with_tasks.user_attrs["tasks"]["models"].values()
    assert all(set(m["results"]) == {"books-cloze", "books-lastword"} for m in models)


def test_the_task_limit_is_kept(with_tasks):
    results = with_tasks.user_attrs["tasks"]["models"]["best"]["results"].values()
    assert [r["samples"] for r in results] == [2, 2]


def test_the_retained_share_is_the_best_mean_over_the_unpruned_mean(with_tasks):
    tasks = with_tasks.user_attrs["tasks"]
    dense, best = tasks["models"]["unpruned"]["mean_acc"], tasks["models"]["best"]["mean_acc"]
    assert tasks["best_retained"] == (pytest.approx(best / dense) if dense else None)


def test_the_report_shows_the_accuracy_table(with_tasks, tmp_path):
    report = write_report(with_tasks, tmp_path).read_text()
    assert "| model | books-cloze | books-lastword | mean | of unpruned |" in report


def test_tasks_are_not_part_of_what_a_resume_must_match():
    assert tiny_job(tasks=("books-cloze",), task_limit=5).identity() == tiny_job().identity()


def test_a_trial_stopped_early_records_its_windows_and_time(session, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.Trial, "should_prune", lambda self: True)  # stop every searched trial at once
    job = tiny_job(trials=3, baselines=("magnitude",))
    study = run_search(job, None, "stop", session=session, progress=False, artifact_dir=tmp_path).study
    stopped = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(stopped) == 3  # every searched trial; the baseline runs besides them
    assert study.trials[0].state == TrialState.COMPLETE  # baselines are never stopped
    for t in stopped:
        assert t.user_attrs["windows"] == 1
        assert len(t.intermediate_values) == 1
        assert t.user_attrs["seconds"]["validation"] > 0  # the bench's trial cost counts stopped trials too


def test_intermediate_values_are_perplexities_like_the_objective(session, tmp_path):
    study = run_search(tiny_job(trials=3, baselines=("magnitude",)), None, "unit", session=session,
                       progress=False, artifact_dir=tmp_path).study
    assert study.user_attrs["intermediate_unit"] == "perplexity"
    assert study.metric_names == ["validation perplexity"]  # what the dashboard's axes say
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        values = list(t.intermediate_values.values())
        assert len(values) == session.windows("validation").shape[0]
        # the objective is the geometric mean of the per-window perplexities (one validation source)
        assert t.value == pytest.approx(math.exp(sum(math.log(v) for v in values) / len(values)), rel=1e-9)
        assert min(values) <= t.value <= max(values)


def test_a_study_begun_before_the_unit_was_recorded_keeps_log_perplexity(session, tmp_path):
    from adapruner.search.study import intermediate_unit

    storage = optuna.storages.InMemoryStorage()
    old = optuna.create_study(storage=storage, study_name="old")
    old.set_user_attr("adapruner_version", "0.1.0")
    assert intermediate_unit(old) == "log-perplexity"
    study = run_search(tiny_job(trials=2, baselines=("magnitude",)), None, "old", session=session,
                       progress=False, artifact_dir=tmp_path, storage=storage).study
    t = study.trials[0]
    assert t.value == pytest.approx(math.exp(sum(t.intermediate_values.values()) / len(t.intermediate_values)))
    assert intermediate_unit(optuna.create_study()) == "perplexity"  # a study being created by another process


def test_resume_continues_and_budget_may_grow(session, tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run_search(tiny_job(trials=5), url, "r", session=session, progress=False, artifact_dir=tmp_path / "a")
    result = run_search(tiny_job(trials=9), url, "r", session=session, progress=False, artifact_dir=tmp_path / "a")
    numbers = [t.number for t in result.study.trials]
    assert numbers == list(range(len(numbers)))
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in result.study.trials) == \
        tiny_job(trials=9).total_trials
    assert sum(bool(t.user_attrs.get("baseline")) for t in result.study.trials) == len(BASELINE_RUNS)  # once
    with pytest.raises(AdaPrunerError, match="different job .*target"):
        run_search(tiny_job(target=0.3), url, "r", session=session, progress=False)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_retried(session, tmp_path):
    # A process killed between creating its trial and its first heartbeat: Optuna's stale check never
    # sees that trial, which would hold a slot of the budget forever.
    url = f"sqlite:///{tmp_path / 'o.db'}"
    storage = make_storage(url)
    job = tiny_job(trials=4)
    study = create_study(storage, "o", job)
    orphan = study.ask()  # pops the first baseline, as a dying process would
    alive = study.ask()
    alive.set_user_attr("worker", "elsewhere:1")
    storage.record_heartbeat(alive._trial_id)
    fail_dead_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL
    assert states[alive.number] == TrialState.RUNNING
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1
    assert retry[0].state == TrialState.WAITING
    assert retry[0].user_attrs["baseline"] == "llm-pruner"
    storage.set_trial_state_values(alive._trial_id, TrialState.FAIL)  # the other process fails its own

    result = run_search(job, url, "o", session=session, progress=False, artifact_dir=tmp_path / "a", storage=storage)
    trials = result.study.trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == job.total_trials
    assert trials[retry[0].number].state == TrialState.COMPLETE
    assert all("worker" in t.user_attrs for t in trials if t.state != TrialState.FAIL)


def test_failing_trials_are_recorded_not_fatal(session, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = session.plan

    def flaky_plan(config, target, scores=None):
        calls["n"] += 1
        if calls["n"] in (3, 6):
            raise RuntimeError("simulated out of memory")
        return original(config, target, scores)

    monkeypatch.setattr(session, "plan", flaky_plan)
    result = run_search(tiny_job(trials=6), f"sqlite:///{tmp_path / 'f.db'}", "f", session=session,
                        progress=False, artifact_dir=tmp_path / "a")
    failed = [t for t in result.study.trials if t.state == TrialState.FAIL]
    assert failed
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: simulated out of memory" for t in failed)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in result.study.trials) == \
        tiny_job(trials=6).total_trials


@pytest.fixture
def one_trial_out_of_memory(session, tmp_path, monkeypatch):
    """A search whose third trial runs out of device memory while building its pruned copy."""
    import adapruner.search.objective as objective
    import adapruner.session as session_module

    calls, freed = {"n": 0}, []
    original = session_module.prune_model

    def prune(model, plan, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(model, plan, **kwargs)

    monkeypatch.setattr(session_module, "prune_model", prune)
    monkeypatch.setattr(objective, "release_memory", lambda: freed.append(calls["n"]))
    result = run_search(tiny_job(trials=5, baselines=("magnitude",)), f"sqlite:///{tmp_path / 'm.db'}", "m",
                        session=session, progress=False, artifact_dir=tmp_path / "a")
    return result.study, freed


def test_a_trial_out_of_memory_fails_with_the_reason(one_trial_out_of_memory):
    study, _ = one_trial_out_of_memory
    assert [t.user_attrs["fail_reason"] for t in study.trials if t.state == TrialState.FAIL] == \
        ["out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"]


def test_the_study_goes_on_after_a_trial_out_of_memory(one_trial_out_of_memory):
    study, _ = one_trial_out_of_memory
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 5 + 1  # and the baseline


def test_a_trial_out_of_memory_frees_the_device_memory(one_trial_out_of_memory):
    _, freed = one_trial_out_of_memory
    assert freed == [3]


def test_search_that_always_fails_stops_with_a_clear_error(session, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(session, "plan", broken)
    job = tiny_job(trials=3, baselines=(), space=SearchSpace(subset_size=(2, 8), n_clusters=3))
    with pytest.raises(AdaPrunerError, match="trials failed"):
        run_search(job, None, "x", session=session, progress=False, artifact_dir=tmp_path)


def test_a_fixed_layer_range_the_model_lacks_is_refused_before_any_trial(session, tmp_path):
    job = tiny_job(trials=3, baselines=(), space=SearchSpace(subset_size=(2, 8), n_clusters=3,
                                                               fixed={"layer_first": 3, "layer_last": 1}))
    storage = optuna.storages.InMemoryStorage()
    with pytest.raises(AdaPrunerError, match="leave no layer to prune in a model of 4 layers"):
        run_search(job, None, "x", session=session, progress=False, artifact_dir=tmp_path, storage=storage)
    assert not optuna.load_study(study_name="x", storage=storage).trials


@pytest.mark.parametrize("name", ["tpe", "gp", "random", "qmc", "botorch"])
def test_every_sampler_runs(session, tmp_path, name):
    job = tiny_job(trials=4, sampler=name, baselines=("wanda-sp",))
    result = run_search(job, None, f"s-{name}", session=session, progress=False, artifact_dir=tmp_path)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in result.study.trials) == 4 + 1
    assert type(make_sampler(name).sampler).__name__.lower().startswith(name)


@pytest.mark.parametrize("sampler", ["tpe", "gp", "qmc"])
def test_the_experimental_features_we_chose_do_not_warn(tmp_path, sampler, recwarn):
    storage = make_storage(f"sqlite:///{tmp_path / 'w.db'}")
    study = optuna.create_study(storage=storage, sampler=make_sampler(sampler), pruner=make_pruner("wilcoxon", 8))
    fail_dead_trials(study)
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


@pytest.mark.parametrize("name", ["gp", "botorch", "qmc", "tpe"])
def test_samplers_model_the_space_although_baselines_have_no_params(name):
    def objective(trial):
        if trial.user_attrs.get("baseline"):
            return 5.0
        return (trial.suggest_float("x", 0, 1) - 0.3) ** 2 + trial.suggest_float("y", 0, 1)

    sampler = make_sampler(name, seed=0, n_startup_trials=2)
    study = optuna.create_study(sampler=sampler)
    study.enqueue_trial({}, user_attrs={"baseline": "llm-pruner"})  # complete, and with no parameters
    study.optimize(objective, n_trials=4)
    trial = study.trials[-1]
    assert set(sampler.infer_relative_search_space(study, trial)) == {"x", "y"}
    if name != "tpe":  # what the bare sampler sees: nothing to model, so it would sample at random
        assert _make_sampler(name, 0, 2).infer_relative_search_space(study, trial) == {}


def test_a_failed_baseline_is_queued_again_a_few_times():
    job = tiny_job(baselines=("llm-pruner", "magnitude"), baseline_draws=1)
    study = create_study(optuna.storages.InMemoryStorage(), "b", job)

    def flaky_storage(trial):
        if trial.user_attrs["baseline"] == "llm-pruner":
            raise RuntimeError("database is locked")
        return 1.0

    study.optimize(flaky_storage, n_trials=2, catch=(RuntimeError,))
    for attempt in range(BASELINE_ATTEMPTS + 2):
        requeue_failed_baselines(study, job)
        requeue_failed_baselines(study, job)  # once per failure, however often it is called
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        assert len(waiting) == (1 if attempt < BASELINE_ATTEMPTS - 1 else 0)
        assert all(t.user_attrs["baseline"] == "llm-pruner" for t in waiting)
        study.optimize(flaky_storage, n_trials=len(waiting), catch=(RuntimeError,))
    attempts = [t for t in study.trials if t.user_attrs.get("baseline") == "llm-pruner"]
    assert len(attempts) == BASELINE_ATTEMPTS  # then it is given up, and the magnitude one never retried
    assert sum(t.user_attrs.get("baseline") == "magnitude" for t in study.trials) == 1


def test_a_failed_draw_is_queued_again_as_that_draw():
    job = tiny_job(baselines=("llm-pruner",), baseline_draws=2)
    study = create_study(optuna.storages.InMemoryStorage(), "d", job)

    def second_draw_fails(trial):
        if trial.user_attrs["draw"] == 1:
            raise RuntimeError("database is locked")
        return 1.0

    study.optimize(second_draw_fails, n_trials=2, catch=(RuntimeError,))
    requeue_failed_baselines(study, job)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [(t.user_attrs["baseline"], t.user_attrs["draw"]) for t in waiting] == [("llm-pruner", 1)]


def _ask_params(study: optuna.Study) -> dict:
    trial = study.ask()
    params = {"x": trial.suggest_float("x", 0, 1), "k": trial.suggest_int("k", 0, 1000)}
    study.tell(trial, params["x"])
    return params


@pytest.mark.parametrize("name", ["tpe", "gp", "random", "qmc"])
def test_workers_seeded_alike_propose_distinct_configurations(name):
    """Four processes on one study, each with a sampler built from the job's seed, ask in turn."""
    storage = optuna.storages.InMemoryStorage()
    workers = [optuna.create_study(storage=storage, study_name="shared", load_if_exists=True,
                                   sampler=make_sampler(name, seed=7, n_startup_trials=8)) for _ in range(4)]
    proposed = [_ask_params(study) for _ in range(3) for study in workers]
    assert len({tuple(p.items()) for p in proposed}) == len(proposed)


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_one_process_search_is_reproducible(name):
    runs = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(name, seed=3, n_startup_trials=4))
        runs.append([_ask_params(study) for _ in range(8)])
    assert runs[0] == runs[1]
    other = optuna.create_study(sampler=make_sampler(name, seed=4, n_startup_trials=4))
    assert [_ask_params(other) for _ in range(8)] != runs[0]


def test_artifact_store_folder_and_s3(tmp_path):
    import io

    from adapruner.search.artifacts import artifact_store

    class FakeS3:  # the two calls Optuna's Boto3ArtifactStore makes
        def __init__(self):
            self.objects = {}

        def upload_fileobj(self, fileobj, bucket, key):
            self.objects[(bucket, key)] = fileobj.read()

        def get_object(self, Bucket, Key):  # noqa: N803 (boto3's names)
            return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    fake = FakeS3()
    s3 = artifact_store("s3://models", client=fake)
    s3.write("a1", io.BytesIO(b"weights"))
    assert fake.objects == {("models", "a1"): b"weights"}
    assert s3.open_reader("a1").read() == b"weights"
    folder = artifact_store(tmp_path / "store")
    folder.write("a2", io.BytesIO(b"more"))
    assert folder.open_reader("a2").read() == b"more"
    with pytest.raises(AdaPrunerError, match="s3://BUCKET"):
        artifact_store("s3://bucket/prefix")


def test_paired_estimate_compares_like_with_like():
    import math

    from adapruner.search.objective import paired_estimate

    best = {0: 2.0, 1: 4.0, 2: 3.0, 3: 3.0}  # mean loss 3.0 over all windows
    # seen only on the easy window 0, 0.5 worse there than the best: estimated 0.5 worse overall
    assert paired_estimate({0: 2.5}, best, math.exp(3.0)) == pytest.approx(math.exp(3.5))
    # its own partial mean (1.9) would look better than the best (3.0); the estimate never does
    assert paired_estimate({0: 1.9}, best, math.exp(3.0)) > math.exp(3.0)
    assert paired_estimate({7: 1.0}, best, math.exp(3.0)) == math.inf


def test_gp_completes_stopped_trials_with_estimates_that_never_win(session, tmp_path):
    # one step per plan: the sample path on which the GP's proposals include trials stopped early
    job = tiny_job(trials=14, sampler="gp", val_windows=12, baselines=("wanda-sp", "magnitude"),
                   space=replace(SPACE, iterations=(1, 1)))
    study = run_search(job, None, "gp-est", session=session, progress=False, artifact_dir=tmp_path).study
    assert not any(t.state == TrialState.PRUNED for t in study.trials)
    estimated = [t for t in study.trials if t.user_attrs.get("estimated")]
    assert estimated, "no trial was stopped early: the test would prove nothing"
    assert all(t.user_attrs["windows"] < 12 and t.state == TrialState.COMPLETE for t in estimated)
    assert not study.best_trial.user_attrs.get("estimated")
