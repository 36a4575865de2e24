"""Repair after the cut: least-squares re-fit of the kept o_proj/down_proj columns."""

import pytest
import torch
from helpers import make_documents, make_tiny_model

from adapruner.data import build_pool, split_documents
from adapruner.export import load_pruned, save_pruned
from adapruner.importance import Mixture
from adapruner.plan import Allocation, LayerPlan, PruningPlan
from adapruner.prune import prune_model
from adapruner.repair import (
    REPAIRED,
    Repair,
    collect_grams,
    kept_columns,
    refit_columns,
    repair_pruned,
    repair_sequential,
    weight_grams,
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


def output_error(full: torch.Tensor, cut: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> float:
    """``Σ_t ‖W x_t - W' x_t[K]‖²`` over the tokens whose Gram is ``gram``."""
    diff = full.detach().double().clone()
    diff[:, keep] -= cut.detach().double()
    return float(torch.einsum("oi,ij,oj->", diff, gram.double(), diff))


def test_refit_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g)  # correlated inputs
    w = torch.randn(8, 12, generator=g)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    fitted = refit_columns(w, x.T @ x, keep, ridge=1e-12)
    solution = torch.linalg.lstsq(x[:, keep].double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(fitted.double(), solution, rtol=1e-4, atol=1e-4)


def test_refit_keeping_every_column_returns_the_weight():
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(2))
    w = torch.randn(5, 10)
    torch.testing.assert_close(refit_columns(w, x.T @ x, torch.arange(10), ridge=1e-12), w, rtol=1e-4, atol=1e-4)


def test_the_ridge_shrinks_the_fit():
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(3))
    w, keep = torch.randn(5, 10), torch.arange(6)
    loose, tight = refit_columns(w, x.T @ x, keep, 1e-6), refit_columns(w, x.T @ x, keep, 10.0)
    assert tight.norm() < loose.norm()


def test_repair_brings_every_cut_projection_closer_to_the_dense_output():
    dense = make_tiny_model()
    plan = cut_plan(dense)
    grams = collect_grams(dense, WINDOWS, batch_size=5, progress=False)
    assert set(grams) == {(i, m) for i in range(4) for m in REPAIRED}
    cut = prune_model(dense, plan)
    repaired = repair_pruned(prune_model(dense, plan), dense, plan, grams, ridge=1e-6)
    keep = kept_columns(model_structure(dense), plan)
    assert keep  # the plan cuts something in every layer
    for (i, module), columns in keep.items():
        full = layer_linears(decoder_layers(dense)[i])[module].weight
        before = output_error(full, layer_linears(decoder_layers(cut)[i])[module].weight, columns, grams[(i, module)])
        after = output_error(full, layer_linears(decoder_layers(repaired)[i])[module].weight, columns,
                             grams[(i, module)])
        assert after < before
    reference = logits(dense)
    assert (logits(repaired) - reference).square().mean() < (logits(cut) - reference).square().mean()


def test_grams_are_the_inputs_second_moments():
    dense = make_tiny_model()
    seen = []
    handle = decoder_layers(dense)[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().flatten(0, -2)))
    logits(dense)
    handle.remove()
    x = torch.cat(seen)
    grams = collect_grams(dense, WINDOWS, batch_size=4, progress=False)  # batching does not change the sum
    torch.testing.assert_close(grams[(1, "down_proj")], x.T @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["pool", "sequential"])
def test_a_plan_that_cuts_nothing_repairs_nothing(mode):
    dense = make_tiny_model()
    plan = PruningPlan.keep_all(model_structure(dense))
    pruned = prune_model(dense, plan)
    if mode == "pool":
        repair_pruned(pruned, dense, plan, collect_grams(dense, WINDOWS, progress=False), 1e-2)
    else:
        repair_sequential(pruned, dense, plan, WINDOWS, 1e-2)
    assert torch.equal(logits(pruned), logits(dense))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_sequential_repair_fits_the_first_cut_layer_as_the_pool_does_and_leaves_the_dense_model(model_type):
    dense = make_tiny_model(model_type)
    before = logits(dense)
    plan = cut_plan(dense, layers={0, 2})
    pool = repair_pruned(prune_model(dense, plan), dense, plan, collect_grams(dense, WINDOWS, progress=False), 1e-3)
    sequential = repair_sequential(prune_model(dense, plan), dense, plan, WINDOWS, 1e-3, batch_size=5)
    first = lambda m: decoder_layers(m)[0].self_attn.o_proj.weight  # noqa: E731  (same inputs: same Gram)
    torch.testing.assert_close(first(sequential), first(pool), rtol=1e-4, atol=1e-5)
    third = lambda m: decoder_layers(m)[2].self_attn.o_proj.weight  # noqa: E731  (pruned inputs: another Gram)
    assert not torch.allclose(third(sequential), third(pool), atol=1e-5)
    assert torch.equal(logits(dense), before)  # the dense blocks lent to the pruned layers are given back
    assert all(p.self_attn is not d.self_attn and p.mlp is not d.mlp
               for p, d in zip(decoder_layers(sequential), decoder_layers(dense), strict=True))


@pytest.mark.parametrize("mode", ["pool", "sequential"])
def test_repairing_a_copy_that_shares_the_uncut_weights_leaves_the_dense_model(mode):
    """A trial prunes with share_unchanged and may repair: the repair writes only what the copy owns."""
    dense = make_tiny_model("qwen2")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    plan = cut_plan(dense, layers={0, 2})
    shared, full = prune_model(dense, plan, share_unchanged=True), prune_model(dense, plan)
    if mode == "pool":
        grams = collect_grams(dense, WINDOWS, progress=False)
        shared, full = (repair_pruned(m, dense, plan, grams, 1e-3) for m in (shared, full))
    else:
        shared, full = (repair_sequential(m, dense, plan, WINDOWS, 1e-3) for m in (shared, full))
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
    assert repaired.repair == Repair("pool")
    assert plain.repair == Repair()
    assert (repaired.mixture, repaired.subset, repaired.allocation) == (plain.mixture, plain.subset, plain.allocation)
    model, plan = session.prune(plain, 0.2)
    fixed, fixed_plan = session.prune(repaired, 0.2)
    assert fixed_plan == plan
    assert len(calls) == 1  # one float16 backward serves both
    assert calls[0]["dtype"] == torch.float16
    assert not torch.equal(logits(fixed), logits(model))
    # a new session on the same model and pool reads the backward and the Grams from the disk cache
    again = toy_session(tiny_tokenizer)
    assert any(again._cache_path("grams", "").parent.glob("*.safetensors"))
    second, _ = again.prune(repaired, 0.2)
    assert len(calls) == 1
    assert torch.equal(logits(second), logits(fixed))


def test_a_session_without_a_cache_measures_the_grams_itself(tiny_tokenizer):
    session = toy_session(tiny_tokenizer, cache=False)
    config = PruneConfig(Mixture.single("magnitude_l2"), (0, 1), Allocation(), Repair("pool", 1e-3))
    model, plan = session.prune(config, 0.2)
    grams = collect_grams(session.model, session.pool.windows, progress=False)
    expected = repair_pruned(prune_model(session.model, plan), session.model, plan, grams, 1e-3,
                             weight_grams(session.model, grams))
    assert torch.equal(logits(model), logits(expected))
    assert not any(session._cache_path("grams", "").parent.iterdir())


def test_a_singular_gram_is_handled_by_the_ridge():
    dense = make_tiny_model()
    same = torch.full((4, 3), 7)  # duplicate windows of one token: rank <= 3, far below the 96 channels
    plan = cut_plan(dense)
    grams = collect_grams(dense, same, progress=False)
    assert torch.linalg.matrix_rank(grams[(0, "down_proj")].double()) < grams[(0, "down_proj")].shape[0]
    repaired = repair_pruned(prune_model(dense, plan), dense, plan, grams, ridge=1e-2)
    assert all(torch.isfinite(p).all() for p in repaired.parameters())
    assert torch.isfinite(logits(repaired)).all()


def test_a_repaired_model_saves_and_loads_with_identical_logits(tmp_path, tiny_tokenizer):
    dense = make_tiny_model()
    plan = cut_plan(dense)
    repaired = repair_pruned(prune_model(dense, plan), dense, plan, collect_grams(dense, WINDOWS, progress=False),
                             1e-3)
    save_pruned(repaired, tiny_tokenizer, tmp_path / "model")
    loaded, _ = load_pruned(tmp_path / "model")
    assert torch.equal(logits(loaded), logits(repaired))
    assert not torch.equal(logits(repaired), logits(prune_model(dense, plan)))  # the saved weights are re-fitted


def test_a_search_with_repair_in_its_space_reports_it(tiny_tokenizer, tmp_path):
    from adapruner.search import SearchJob, SearchSpace, run_search
    from adapruner.search.report import write_report

    space = SearchSpace(subset_size=(2, 6), n_clusters=3, repairs=("pool",))
    job = SearchJob(model="tiny", calibration=("toy",), trials=5, pool_size=16, seq_len=32, val_windows=6,
                    test_windows=6, baselines=("llm-pruner", "llm-pruner+repair"), space=space)
    study = run_search(job, f"sqlite:///{tmp_path / 'runs.db'}", "r", session=toy_session(tiny_tokenizer),
                       artifact_dir=tmp_path / "a", progress=False).study
    searched = [t for t in study.trials if not t.user_attrs.get("baseline") and "config" in t.user_attrs]
    assert searched
    assert all(t.user_attrs["config"]["repair"]["mode"] == "pool" for t in searched)
    assert all("repair" in t.user_attrs["seconds"] for t in searched)
    report = write_report(study, tmp_path / "out").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| baseline: llm-pruner+repair "))
    assert row.split("|")[-2].strip() == "pool, ridge 0.01"
    row = next(line for line in report.splitlines() if line.startswith("| baseline: llm-pruner "))
    assert row.split("|")[-2].strip() == "off"


def test_a_precomputed_weight_gram_gives_the_same_fit():
    dense = make_tiny_model()
    plan = cut_plan(dense)
    grams = collect_grams(dense, WINDOWS, progress=False)
    direct = repair_pruned(prune_model(dense, plan), dense, plan, grams, 1e-3)
    cached = repair_pruned(prune_model(dense, plan), dense, plan, grams, 1e-3, weight_grams(dense, grams))
    torch.testing.assert_close(logits(cached), logits(direct), rtol=1e-5, atol=1e-5)
