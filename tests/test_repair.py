"""Repair after the cut: the removed columns' contribution predicted from the kept ones (ridge regression with an
intercept), or FLAP's bias compensation alone."""

import pytest
import torch
from helpers import make_documents, make_tiny_model
from torch import nn

from adapruner.cache import cache_dir
from adapruner.data import build_pool, split_documents, tokenize_windows
from adapruner.errors import AdaPrunerError
from adapruner.export import load_pruned, save_pruned
from adapruner.importance import Mixture
from adapruner.plan import Allocation, LayerPlan, PruningPlan
from adapruner.prune import prune_model
from adapruner.repair import (
    REPAIRED,
    SOLVE_DTYPE,
    InputMoments,
    Repair,
    collect_moments,
    compensate,
    kept_columns,
    repair_pruned,
    repair_sequential,
)
from adapruner.search.baselines import baseline_config
from adapruner.session import PruneConfig, PruningSession
from adapruner.structure import decoder_layers, layer_linears, model_structure

WINDOWS = torch.randint(0, 320, (12, 24), generator=torch.Generator().manual_seed(0))


def cut_plan(model, layers=None, keep_fraction=0.5, seed=0):
    """Keep ``keep_fraction`` of the groups and channels of ``layers`` (default: all), the rest whole."""
    structure = model_structure(model)
    g = torch.Generator().manual_seed(seed)
    plans, removed = [], 0
    for i, s in enumerate(structure.layers):
        if layers is not None and i not in layers:
            plans.append(LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))))
            continue
        n_groups, n_channels = max(1, round(s.n_groups * keep_fraction)), max(1, round(s.n_channels * keep_fraction))
        plans.append(LayerPlan(tuple(sorted(torch.randperm(s.n_groups, generator=g)[:n_groups].tolist())),
                               tuple(sorted(torch.randperm(s.n_channels, generator=g)[:n_channels].tolist()))))
        removed += (s.n_groups - n_groups) * s.group_params + (s.n_channels - n_channels) * s.channel_params
    return PruningPlan(tuple(plans), removed, structure.total_params)


def logits(model, ids=WINDOWS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def output_error(full: nn.Linear, cut: nn.Linear, keep: torch.Tensor, x: torch.Tensor) -> float:
    """``mean_t ‖W x_t - (W' x_t[K] + b')‖²`` over the tokens ``x``."""
    with torch.no_grad():
        return float((full(x) - cut(x[:, keep])).double().square().sum(1).mean())


def inputs_of(model, module_key, windows=WINDOWS) -> torch.Tensor:
    """Every token's input of one o_proj/down_proj, ``[tokens, in]``."""
    i, module = module_key
    seen = []
    handle = layer_linears(decoder_layers(model)[i])[module].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().flatten(0, -2)))
    logits(model, windows)
    handle.remove()
    return torch.cat(seen)


def regression_data(seed=1, n=400, d=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + torch.randn(d, generator=g)  # correlated,
    return x, torch.randn(8, d, generator=g)                                                          # not centred


def moments_of(x):
    mean = x.double().mean(0)
    return mean, (x.double().T @ x.double()) / x.shape[0] - torch.outer(mean, mean)


def test_a_vanishing_ridge_is_least_squares_with_an_intercept():
    x, w = regression_data()
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    mean, cov = moments_of(x)
    kept, bias = compensate(w, mean, cov, keep, ridge=1e-12, dtype=torch.float64)
    design = torch.cat([x[:, keep], torch.ones(x.shape[0], 1)], 1).double()
    solution = torch.linalg.lstsq(design, (x @ w.T).double()).solution.T
    torch.testing.assert_close(kept.double(), solution[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.double(), solution[:, -1], rtol=1e-4, atol=1e-4)


def test_the_float32_solve_fits_as_well_as_float64_at_the_smallest_searched_ridge():
    """The repair solves in float32 (SOLVE_DTYPE): on inputs whose channel scales span four decades (activation
    outliers), correlated, not centred, its fit is the float64 one's to a part in a million."""
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 256
    scales = torch.logspace(-2, 2, d)[torch.randperm(d, generator=g)]
    x = (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / 16) * scales + torch.randn(d, generator=g)
    w = torch.randn(64, d, generator=g)
    mean, cov = moments_of(x)
    keep = torch.sort(torch.randperm(d, generator=g)[:200]).values
    assert SOLVE_DTYPE == torch.float32

    def error(kept, bias):
        return float(((x @ w.T).double() - (x[:, keep] @ kept.T + bias).double()).square().mean())

    wide = compensate(w, mean, cov.float(), keep, ridge=1e-3, dtype=torch.float64)
    narrow = compensate(w, mean, cov.float(), keep, ridge=1e-3)
    assert error(*narrow) == pytest.approx(error(*wide), rel=1e-6)
    assert error(*narrow) < 0.6 * error(w[:, keep], torch.zeros(64))  # and the fit is a real one
    change = (wide[0] - w[:, keep]).norm()
    assert float((narrow[0] - wide[0]).norm() / change) < 1e-5


def test_without_a_covariance_it_is_flaps_bias_compensation():
    x, w = regression_data(2)
    keep = torch.tensor([1, 4, 5, 9])
    removed = torch.tensor([i for i in range(12) if i not in keep.tolist()])
    mean, cov = moments_of(x)
    kept, bias = compensate(w, mean.float(), None, keep, ridge=1.0)
    assert torch.equal(kept, w[:, keep])
    torch.testing.assert_close(bias, w[:, removed] @ mean.float()[removed])
    # ... which is the limit of a ridge growing without bound
    far, far_bias = compensate(w, mean, cov, keep, ridge=1e9)
    torch.testing.assert_close(far, kept, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(far_bias, bias, rtol=1e-4, atol=1e-5)


def test_keeping_every_column_changes_nothing():
    x, w = regression_data(3)
    mean, cov = moments_of(x)
    kept, bias = compensate(w, mean, cov, torch.arange(12), ridge=1e-3)
    assert torch.equal(kept, w)
    assert torch.equal(bias, torch.zeros(8))


def test_the_ridge_moves_the_fit_from_least_squares_to_the_plain_cut():
    x, w = regression_data(4)
    keep = torch.arange(6)
    mean, cov = moments_of(x)
    change = [float((compensate(w, mean, cov, keep, ridge)[0] - w[:, keep]).norm()) for ridge in (1e-6, 1e-1, 1e2)]
    assert change[0] > change[1] > change[2]


def test_the_default_ridge_is_the_kept_columns_per_token():
    x, w = regression_data(5)
    keep = torch.tensor([0, 1, 2, 5, 6])
    mean, cov = moments_of(x)
    by_rule = compensate(w, mean, cov, keep, None, tokens=400)
    for got, want in zip(by_rule, compensate(w, mean, cov, keep, 5 / 400), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(AdaPrunerError, match="tokens"):
        compensate(w, mean, cov, keep, None)
    with pytest.raises(AdaPrunerError, match="ridge"):
        Repair("pool", 0.0)
    assert Repair("pool").ridge is None


@pytest.mark.parametrize("mode", ["bias", "pool"])
def test_repair_brings_every_cut_projection_closer_to_the_dense_output(mode):
    dense = make_tiny_model()
    plan = cut_plan(dense)
    moments = collect_moments(dense, WINDOWS, batch_size=5, progress=False)
    assert set(moments.mean) == set(moments.covariance) == {(i, m) for i in range(4) for m in REPAIRED}
    cut = prune_model(dense, plan)
    repaired = repair_pruned(prune_model(dense, plan), dense, plan, moments, Repair(mode, 1e-6))
    keep = kept_columns(model_structure(dense), plan)
    assert keep  # the plan cuts something in every layer
    for (i, module), columns in keep.items():
        x = inputs_of(dense, (i, module))
        full = layer_linears(decoder_layers(dense)[i])[module]
        before = output_error(full, layer_linears(decoder_layers(cut)[i])[module], columns, x)
        after = output_error(full, layer_linears(decoder_layers(repaired)[i])[module], columns, x)
        assert after < before
    reference = logits(dense)
    assert (logits(repaired) - reference).square().mean() < (logits(cut) - reference).square().mean()


def test_moments_are_the_inputs_mean_and_covariance():
    dense = make_tiny_model()
    x = inputs_of(dense, (1, "down_proj")).double()
    moments = collect_moments(dense, WINDOWS, batch_size=4, progress=False)  # batching does not change the sums
    assert moments.tokens == WINDOWS.numel()
    mean, cov = moments_of(x)
    torch.testing.assert_close(moments.mean[(1, "down_proj")].double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moments.covariance[(1, "down_proj")].double(), cov, rtol=1e-4, atol=1e-5)


def test_moments_save_and_load(tmp_path):
    moments = collect_moments(make_tiny_model(), WINDOWS, progress=False)
    moments.save(tmp_path / "m.safetensors")
    loaded = InputMoments.load(tmp_path / "m.safetensors")
    assert loaded.tokens == moments.tokens
    assert all(torch.equal(loaded.covariance[k], moments.covariance[k]) and torch.equal(loaded.mean[k], moments.mean[k])
               for k in moments.mean)


@pytest.mark.parametrize("mode", ["bias", "pool", "sequential"])
def test_a_plan_that_cuts_nothing_repairs_nothing(mode):
    dense = make_tiny_model()
    plan = PruningPlan.keep_all(model_structure(dense))
    pruned = prune_model(dense, plan)
    if mode == "sequential":
        repair_sequential(pruned, dense, plan, WINDOWS, 1e-2)
    else:
        repair_pruned(pruned, dense, plan, collect_moments(dense, WINDOWS, progress=False), Repair(mode))
    assert torch.equal(logits(pruned), logits(dense))
    assert all(layer_linears(layer)["o_proj"].bias is None for layer in decoder_layers(pruned))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_sequential_repair_fits_the_first_cut_layer_as_the_pool_does_and_leaves_the_dense_model(model_type):
    dense = make_tiny_model(model_type)
    before = logits(dense)
    plan = cut_plan(dense, layers={0, 2})
    moments = collect_moments(dense, WINDOWS, progress=False)
    pool = repair_pruned(prune_model(dense, plan), dense, plan, moments, Repair("pool", 1e-3))
    sequential = repair_sequential(prune_model(dense, plan), dense, plan, WINDOWS, 1e-3, batch_size=5)
    first = lambda m: decoder_layers(m)[0].self_attn.o_proj  # noqa: E731  (same inputs: same moments)
    torch.testing.assert_close(first(sequential).weight, first(pool).weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first(sequential).bias, first(pool).bias, rtol=1e-4, atol=1e-5)
    third = lambda m: decoder_layers(m)[2].self_attn.o_proj.weight  # noqa: E731  (pruned inputs: other moments)
    assert not torch.allclose(third(sequential), third(pool), atol=1e-5)
    assert torch.equal(logits(dense), before)  # the dense blocks lent to the pruned layers are given back
    assert all(p.self_attn is not d.self_attn and p.mlp is not d.mlp
               for p, d in zip(decoder_layers(sequential), decoder_layers(dense), strict=True))


@pytest.mark.parametrize("mode", ["bias", "pool", "sequential"])
def test_repairing_a_copy_that_shares_the_uncut_weights_leaves_the_dense_model(mode):
    """A trial prunes with share_unchanged and may repair: the repair writes only what the copy owns."""
    dense = make_tiny_model("qwen2")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    plan = cut_plan(dense, layers={0, 2})
    shared, full = prune_model(dense, plan, share_unchanged=True), prune_model(dense, plan)
    if mode == "sequential":
        shared, full = (repair_sequential(m, dense, plan, WINDOWS, 1e-3) for m in (shared, full))
    else:
        moments = collect_moments(dense, WINDOWS, progress=False)
        shared, full = (repair_pruned(m, dense, plan, moments, Repair(mode, 1e-3)) for m in (shared, full))
    assert set(dense.state_dict()) == set(before)  # no bias was added to the dense model's projections
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert torch.equal(logits(shared), logits(full))


def test_a_config_stored_before_repair_existed_is_not_repaired():
    config = PruneConfig.from_dict({"mixture": {"weights": {"wanda_sp": 1.0}, "aggregation": "sum", "seed": 0},
                                    "subset": [0, 1], "allocation": {"first": 0, "last": 0, "strength": 0.0,
                                                                     "attn_share": None}})
    assert config.repair == Repair()
    with_repair = PruneConfig(config.mixture, config.subset, config.allocation, Repair("pool", 0.5))
    assert PruneConfig.from_dict(with_repair.to_dict()) == with_repair


def toy_session(tokenizer, cache=True):
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tokenizer, [(source, 16)], seq_len=32)
    return PruningSession(make_tiny_model(), tokenizer, pool, [source], max_eval_windows=6, progress=False,
                          cache_statistics=cache)


def test_the_repaired_baseline_is_llm_pruners_model_refitted_from_one_backward(tiny_tokenizer, monkeypatch):
    import adapruner.session as session_module

    calls = []
    exact = session_module.taylor_first_exact
    monkeypatch.setattr(session_module, "taylor_first_exact", lambda *a, **k: calls.append(k) or exact(*a, **k))
    session = toy_session(tiny_tokenizer)
    plain, repaired = (baseline_config(name, session) for name in ("llm-pruner", "llm-pruner+repair"))
    assert repaired.repair == Repair("pool")  # the ridge by its rule
    assert plain.repair == Repair()
    assert (repaired.mixture, repaired.subset, repaired.allocation) == (plain.mixture, plain.subset, plain.allocation)
    model, plan = session.prune(plain, 0.2)
    fixed, fixed_plan = session.prune(repaired, 0.2)
    assert fixed_plan == plan
    assert len(calls) == 1  # one float16 backward serves both
    assert calls[0]["dtype"] == torch.float16
    assert not torch.equal(logits(fixed), logits(model))
    # a new session on the same model and pool reads the backward and the moments from the disk cache
    again = toy_session(tiny_tokenizer)
    assert any(cache_dir("moments").glob("*/part-*.safetensors"))  # a folder of parts, one per group of layers
    second, _ = again.prune(repaired, 0.2)
    assert len(calls) == 1
    assert torch.equal(logits(second), logits(fixed))


def test_a_session_without_a_cache_measures_the_moments_itself(tiny_tokenizer):
    session = toy_session(tiny_tokenizer, cache=False)
    config = PruneConfig(Mixture.single("magnitude_l2"), (0, 1), Allocation(), Repair("pool", 1e-3))
    model, plan = session.prune(config, 0.2)
    moments = collect_moments(session.model, session.repair_pool, progress=False)
    expected = repair_pruned(prune_model(session.model, plan), session.model, plan, moments, Repair("pool", 1e-3))
    assert torch.equal(logits(model), logits(expected))
    assert not any(cache_dir("moments").iterdir())


def test_the_repair_windows_are_many_windows_of_the_calibration_sources_pool_parts(tiny_tokenizer):
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tiny_tokenizer, [(source, 4)], seq_len=32)
    session = PruningSession(make_tiny_model(), tiny_tokenizer, pool, [source], train_sources=[source],
                             progress=False, cache_statistics=False, repair_windows=20)
    assert session.repair_pool.shape == (20, 32)  # more windows than the pool's 4
    everything = tokenize_windows(tiny_tokenizer, source.pool, 32)
    assert all(any(torch.equal(w, v) for v in everything) for w in session.repair_pool)  # pool part, never held out


def test_a_singular_covariance_is_handled_by_the_ridge():
    dense = make_tiny_model()
    same = torch.full((4, 3), 7)  # duplicate windows of one token: rank <= 3, far below the 96 channels
    plan = cut_plan(dense)
    moments = collect_moments(dense, same, progress=False)
    assert torch.linalg.matrix_rank(moments.covariance[(0, "down_proj")].double(), atol=1e-6) < 96
    repaired = repair_pruned(prune_model(dense, plan), dense, plan, moments, Repair("pool", 1e-8))
    assert all(torch.isfinite(p).all() for p in repaired.parameters())
    assert torch.isfinite(logits(repaired)).all()


@pytest.mark.parametrize("mode", ["bias", "pool"])
def test_a_repaired_model_saves_and_loads_with_identical_logits(tmp_path, tiny_tokenizer, mode):
    dense = make_tiny_model()
    plan = cut_plan(dense, layers={1, 3})
    repaired = repair_pruned(prune_model(dense, plan), dense, plan, collect_moments(dense, WINDOWS, progress=False),
                             Repair(mode, 1e-3))
    save_pruned(repaired, tiny_tokenizer, tmp_path / "model")
    loaded, _ = load_pruned(tmp_path / "model")
    assert torch.equal(logits(loaded), logits(repaired))
    assert not torch.equal(logits(repaired), logits(prune_model(dense, plan)))  # the saved weights are repaired
    assert (tmp_path / "model" / "modeling_pruned.py").is_file()  # o_proj/down_proj biases: the class builds them


def test_a_search_with_repair_in_its_space_reports_it(tiny_tokenizer, tmp_path):
    from adapruner.search import SearchJob, SearchSpace, run_search
    from adapruner.search.report import write_report

    space = SearchSpace(subset_size=(2, 6), n_clusters=3, repairs=("pool",))
    job = SearchJob(model="tiny", calibration=("toy",), trials=5, pool_size=16, seq_len=32, val_windows=6,
                    test_windows=6, baselines=("llm-pruner", "llm-pruner+repair"), baseline_draws=1, space=space,
                    measure_cost=False)
    study = run_search(job, f"sqlite:///{tmp_path / 'runs.db'}", "r", session=toy_session(tiny_tokenizer),
                       artifact_dir=tmp_path / "a", progress=False).study
    searched = [t for t in study.trials if not t.user_attrs.get("baseline") and "config" in t.user_attrs]
    assert searched
    assert all(t.user_attrs["config"]["repair"]["mode"] == "pool" for t in searched)
    assert all("repair" in t.user_attrs["seconds"] for t in searched)
    report = write_report(study, tmp_path / "out").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| baseline: llm-pruner+repair "))
    assert row.split("|")[-2].strip() == "pool, ridge k/T"
    row = next(line for line in report.splitlines() if line.startswith("| baseline: llm-pruner "))
    assert row.split("|")[-2].strip() == "off"


def test_moments_by_groups_of_layers_equal_one_pass(tmp_path):
    """A chunk budget of one layer runs the layers one group at a time, the hidden states carried between them:
    the same moments as one pass, written as one part per group and read back mapped."""
    dense = make_tiny_model()
    whole = collect_moments(dense, WINDOWS, batch_size=5, progress=False)
    grouped = collect_moments(dense, WINDOWS, batch_size=5, progress=False, folder=tmp_path, chunk_bytes=1)
    assert len(list(tmp_path.glob("part-*.safetensors"))) == len(decoder_layers(dense))
    assert grouped.tokens == whole.tokens and set(grouped.covariance) == set(whole.covariance)
    for key in whole.mean:
        torch.testing.assert_close(grouped.mean[key], whole.mean[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped.covariance[key], whole.covariance[key], rtol=1e-5, atol=1e-6)


def test_a_groups_sums_fit_the_budget():
    from adapruner.repair import _layer_groups

    layers = decoder_layers(make_tiny_model())
    per_layer = sum(12 * layer_linears(layers[0])[m].in_features ** 2 for m in REPAIRED)
    assert _layer_groups(layers, 10**12) == [[0, 1, 2, 3]]
    assert _layer_groups(layers, 2 * per_layer) == [[0, 1], [2, 3]]
    assert _layer_groups(layers, 1) == [[0], [1], [2], [3]]  # a layer over the budget still goes, alone


def test_a_job_that_may_regress_measures_the_moments_once_for_both_repairs(tiny_tokenizer, monkeypatch):
    """A search whose space, baselines or informed start may take the pool repair has its session read the bias
    repair's means from the full moments: one pass, not a pass of means and then one of moments."""
    import adapruner.session as session_module
    from adapruner.search import SearchJob, SearchSpace

    assert SearchJob().regresses
    assert SearchJob(space=SearchSpace(fixed={"repair": "pool"})).regresses
    assert SearchJob(space=SearchSpace(repairs=("off", "bias")), baselines=("llm-pruner+repair",),
                     start="random").regresses
    assert not SearchJob(space=SearchSpace(repairs=("off", "bias")), baselines=("flap",), start="random").regresses
    assert not SearchJob(space=SearchSpace(fixed={"repair": "bias"}), baselines=("llm-pruner",),
                         start="random").regresses
    asked = []
    collect = session_module.collect_moments
    monkeypatch.setattr(session_module, "collect_moments",
                        lambda *a, **k: asked.append(k["covariance"]) or collect(*a, **k))
    session = toy_session(tiny_tokenizer)
    session.means_alone = False
    session.prune(PruneConfig(Mixture.single("magnitude_l2"), (0, 1), Allocation(), Repair("bias")), 0.2)
    session.prune(PruneConfig(Mixture.single("magnitude_l2"), (0, 1), Allocation(), Repair("pool", 1e-3)), 0.2)
    assert asked == [True]


def test_the_means_alone_are_the_full_moments_means_and_repair_the_bias_mode_alike(tmp_path):
    dense = make_tiny_model()
    plan = cut_plan(dense)
    full = collect_moments(dense, WINDOWS, batch_size=5, progress=False)
    means = collect_moments(dense, WINDOWS, batch_size=5, progress=False, folder=tmp_path, chunk_bytes=1,
                            covariance=False)
    assert len(list(tmp_path.glob("part-*.safetensors"))) == 1  # one group: no sums of products to bound
    assert means.covariance == {} and means.tokens == full.tokens and set(means.mean) == set(full.mean)
    for key in full.mean:
        torch.testing.assert_close(means.mean[key], full.mean[key], rtol=1e-5, atol=1e-6)
    by_means = repair_pruned(prune_model(dense, plan), dense, plan, means, Repair("bias"))
    by_full = repair_pruned(prune_model(dense, plan), dense, plan, full, Repair("bias"))
    torch.testing.assert_close(logits(by_means), logits(by_full), rtol=1e-5, atol=1e-5)
    with pytest.raises(AdaPrunerError, match="covariances"):
        repair_pruned(prune_model(dense, plan), dense, plan, means, Repair("pool"))


def test_a_session_repairing_by_the_bias_alone_never_measures_the_covariances(tiny_tokenizer, monkeypatch):
    import adapruner.session as session_module

    asked = []
    collect = session_module.collect_moments
    monkeypatch.setattr(session_module, "collect_moments",
                        lambda *a, **k: asked.append(k["covariance"]) or collect(*a, **k))
    bias = PruneConfig(Mixture.single("magnitude_l2"), (0, 1), Allocation(), Repair("bias"))
    pool = PruneConfig(Mixture.single("magnitude_l2"), (0, 1), Allocation(), Repair("pool", 1e-3))
    session = toy_session(tiny_tokenizer)
    first, _ = session.prune(bias, 0.2)
    assert asked == [False] and "moments" not in session.__dict__
    assert [p.name.endswith("-means") for p in cache_dir("moments").iterdir()] == [True]
    session.prune(pool, 0.2)  # the pool repair measures the covariances, and later sessions' bias reads them
    assert asked == [False, True]
    again = toy_session(tiny_tokenizer)
    second, _ = again.prune(bias, 0.2)
    assert asked == [False, True] and again.means is again.moments
    torch.testing.assert_close(logits(second), logits(first), rtol=1e-5, atol=1e-5)


def test_moments_by_panels_of_the_upper_triangle_and_float32_partial_sums_equal_the_direct_ones(monkeypatch):
    """Every input cut into panels (only the blocks on and above the diagonal multiplied), the float32 products of
    two batches summed before they join the float64 sums: the same moments as computed directly in float64."""
    import adapruner.repair as repair_module

    monkeypatch.setattr(repair_module, "GRAM_PANEL_MIN", 1)
    monkeypatch.setattr(repair_module, "FLUSH_BATCHES", 2)
    assert len(repair_module.gram_edges(96)) == repair_module.GRAM_PANELS + 1
    dense = make_tiny_model()
    moments = collect_moments(dense, WINDOWS, batch_size=3, progress=False)  # 4 batches: two flushes
    for key in [(0, "o_proj"), (1, "down_proj"), (3, "down_proj")]:
        mean, cov = moments_of(inputs_of(dense, key))
        torch.testing.assert_close(moments.mean[key].double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(moments.covariance[key].double(), cov, rtol=1e-4, atol=1e-5)
        assert torch.equal(moments.covariance[key], moments.covariance[key].T)


def test_a_large_mean_costs_the_covariance_nothing():
    """Inputs a thousand times their spread away from zero: their covariance is measured about their mean (the first
    batch's), so the float32 products lose nothing to the cancellation of Σ xᵀx / n - μμᵀ."""
    dense = make_tiny_model()
    key = (1, "down_proj")
    down = layer_linears(decoder_layers(dense)[1])["down_proj"]
    handle = down.register_forward_pre_hook(lambda _m, args: (args[0] + 1000.0,))  # before the recorder's hooks
    try:
        moments = collect_moments(dense, WINDOWS, batch_size=5, progress=False)
        mean, cov = moments_of(inputs_of(dense, key).double())  # the shifted inputs, in float64
    finally:
        handle.remove()
    assert float(mean.mean()) > 999
    torch.testing.assert_close(moments.mean[key].double(), mean, rtol=1e-6, atol=1e-4)
    spread = float(cov.diagonal().mean())
    torch.testing.assert_close(moments.covariance[key].double(), cov, rtol=1e-3, atol=1e-5 * spread)
