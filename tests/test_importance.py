"""Importance from cached per-sample statistics equals a direct computation on the subset."""

import pytest
import torch
from helpers import make_tiny_model

from adapruner.errors import AdaPrunerError
from adapruner.importance import (
    DECOMPOSABLE,
    METRICS,
    PLAN_DEPENDENT,
    Mixture,
    WeightSummary,
    metric_scores,
    subset_importance,
)
from adapruner.statistics import STORED_DTYPE, PoolStatistics, collect_statistics, taylor_first_exact
from adapruner.structure import decoder_layers, layer_linears, model_structure

SUBSET = [4, 1, 6]


def estimator(model, stats, windows):
    shapes = model_structure(model).layers
    return lambda mixture, subset: subset_importance(model, shapes, mixture, subset, stats, windows)


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model("qwen2", seed=5)  # biases exercise the bias terms too
    windows = torch.randint(3, 320, (8, 20), generator=torch.Generator().manual_seed(7))
    stats = collect_statistics(model, windows, progress=False, dtype=torch.float32)  # the arithmetic, unrounded
    return model, windows, stats


def group_members(shape, module, group):
    """Reference: which rows/columns of ``module`` a group owns, written out from the definition."""
    if module in ("gate_proj", "up_proj", "down_proj"):
        return [group]
    heads = range(group * shape.n_rep, (group + 1) * shape.n_rep) if module in ("q_proj", "o_proj") else [group]
    return [h * shape.head_dim + d for h in heads for d in range(shape.head_dim)]


def reference_scores(model, unit_fn, aggregation="sum"):
    """Group scores from per-element tensors: unit_fn(layer, module, linear) -> [units] tensor."""
    shapes = model_structure(model).layers
    attn, mlp = [], []
    for i, layer in enumerate(decoder_layers(model)):
        lins = layer_linears(layer)
        for modules, n, out in ((("q_proj", "k_proj", "v_proj", "o_proj"), shapes[i].n_groups, attn),
                                (("gate_proj", "up_proj", "down_proj"), shapes[i].n_channels, mlp)):
            per_module = []
            for m in modules:
                units = unit_fn(i, m, lins[m])
                per_module.append(torch.stack([units[group_members(shapes[i], m, g)].sum() for g in range(n)]))
            stacked = torch.stack(per_module)
            out.append({"sum": stacked.sum(0), "max": stacked.max(0).values, "last": stacked[-1]}[aggregation])
    return attn, mlp


def per_sample_grads(model, windows):
    """{(layer, module): [n, *weight.shape]} and biases, by a plain loop of backward passes."""
    grads, bias_grads = {}, {}
    for s in range(windows.shape[0]):
        model.zero_grad()
        ids = windows[s : s + 1]
        model(input_ids=ids, labels=ids).loss.backward()
        for i, layer in enumerate(decoder_layers(model)):
            for m, lin in layer_linears(layer).items():
                grads.setdefault((i, m), []).append(lin.weight.grad.clone())
                if lin.bias is not None:
                    bias_grads.setdefault((i, m), []).append(lin.bias.grad.clone())
    model.zero_grad()
    return ({k: torch.stack(v) for k, v in grads.items()}, {k: torch.stack(v) for k, v in bias_grads.items()})


def captured_inputs(model, windows):
    """Inputs of every projection over all tokens of the subset: {(layer, module): [tokens, in]}."""
    seen, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for m, lin in layer_linears(layer).items():
            hooks.append(lin.register_forward_pre_hook(
                lambda mod, args, key=(i, m): seen.setdefault(key, []).append(args[0].detach().flatten(0, 1))))
    with torch.no_grad():
        for s in range(windows.shape[0]):
            model(input_ids=windows[s : s + 1])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def elementwise(lin, module, weight_term, bias_term=None):
    dim = 0 if module in ("o_proj", "down_proj") else 1
    units = weight_term.sum(dim)
    if bias_term is not None and dim == 1:
        units = units + bias_term
    return units


@pytest.fixture(scope="module")
def reference(setup):
    model, windows, _ = setup
    sub = windows[SUBSET]
    grads, bias_grads = per_sample_grads(model, sub)
    inputs = captured_inputs(model, sub)
    w = lambda lin: lin.weight.detach()  # noqa: E731
    b = lambda lin: lin.bias.detach() if lin.bias is not None else None  # noqa: E731

    def bias_part(i, m, lin, fn):
        if lin.bias is None or m in ("o_proj", "down_proj"):
            return None
        return fn(b(lin)[None] * bias_grads[(i, m)]).sum(0) if (i, m) in bias_grads else None

    units = {
        "magnitude_l1": lambda i, m, lin: elementwise(lin, m, w(lin).abs(), None if b(lin) is None else b(lin).abs()),
        "magnitude_l2": lambda i, m, lin: elementwise(lin, m, w(lin).square(),
                                                      None if b(lin) is None else b(lin).square()),
        "taylor_first_persample": lambda i, m, lin: elementwise(
            lin, m, (w(lin)[None] * grads[(i, m)]).abs().sum(0), bias_part(i, m, lin, torch.abs)),
        "taylor_second": lambda i, m, lin: elementwise(
            lin, m, (w(lin)[None] * grads[(i, m)]).square().sum(0), bias_part(i, m, lin, torch.square)),
        "taylor_vector": lambda i, m, lin: elementwise(
            lin, m, w(lin) * grads[(i, m)].sum(0),
            bias_part(i, m, lin, lambda t: t)).abs(),
        "wanda_sp": lambda i, m, lin: elementwise(lin, m, w(lin).abs() * inputs[(i, m)].norm(dim=0)[None]),
    }
    ref = {name: reference_scores(model, fn) for name, fn in units.items()}
    ref["wanda_sp_last"] = reference_scores(model, units["wanda_sp"], "last")
    ref["taylor_second_max"] = reference_scores(model, units["taylor_second"], "max")

    def flap(i, m, lin):
        if m not in ("o_proj", "down_proj"):
            return torch.zeros(lin.out_features)
        x = inputs[(i, m)]
        return x.var(dim=0, unbiased=False) * w(lin).square().sum(0)

    ref["flap_fluctuation"] = reference_scores(model, flap, "last")
    shapes = model_structure(model).layers

    def standardised(x):
        return (x - x.mean()) / x.std()

    layers = list(enumerate(decoder_layers(model)))
    ref["flap"] = (  # FLAP's WIFV as its prune_flap standardises it; a group averages its o_proj columns
        [standardised(flap(i, "o_proj", layer_linears(layer)["o_proj"]).square()).view(shapes[i].n_groups, -1).mean(1)
         for i, layer in layers],
        [standardised(flap(i, "down_proj", layer_linears(layer)["down_proj"])) for i, layer in layers])
    # LLM-Pruner's param_first: one backward over the subset as a single batch
    model.zero_grad()
    model(input_ids=sub, labels=sub).loss.backward()
    ref["taylor_first"] = reference_scores(
        model, lambda i, m, lin: elementwise(lin, m, (w(lin) * lin.weight.grad).abs(),
                                             None if lin.bias is None or m == "o_proj"
                                             else (b(lin) * lin.bias.grad).abs()))
    model.zero_grad()
    return ref


def assert_scores_close(scores, ref):
    attn, mlp = ref
    for got, want in zip(scores.attn + scores.mlp, attn + mlp, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("metric", [m for m in DECOMPOSABLE if m not in ("random", *PLAN_DEPENDENT)])
def test_metric_from_statistics_equals_direct(setup, reference, metric):
    model, windows, stats = setup
    estimate = estimator(model, stats, windows)
    assert_scores_close(estimate(Mixture.single(metric), SUBSET), reference[metric])


@pytest.mark.parametrize(("metric", "aggregation", "key"), [
    ("wanda_sp", "last", "wanda_sp_last"), ("taylor_second", "max", "taylor_second_max"),
])
def test_aggregations(setup, reference, metric, aggregation, key):
    model, windows, stats = setup
    estimate = estimator(model, stats, windows)
    assert_scores_close(estimate(Mixture.single(metric, aggregation), SUBSET), reference[key])


def test_taylor_first_exact_equals_one_batch_backward(setup, reference):
    model, windows, stats = setup
    estimate = estimator(model, stats, windows)
    assert_scores_close(estimate(Mixture.single("taylor_first"), SUBSET), reference["taylor_first"])
    # and it really is not the per-sample variant
    per_sample = estimate(Mixture.single("taylor_first_persample"), SUBSET)
    assert not torch.allclose(per_sample.mlp[0], reference["taylor_first"][1][0].float())


def test_subset_changes_importance(setup):
    model, windows, stats = setup
    estimate = estimator(model, stats, windows)
    a = estimate(Mixture.single("taylor_second"), [0, 1])
    b = estimate(Mixture.single("taylor_second"), [2, 3])
    assert not torch.allclose(a.mlp[1], b.mlp[1])


def test_statistics_round_trip(setup, tmp_path):
    _, _, stats = setup
    stats.save(tmp_path / "stats.safetensors")
    again = PoolStatistics.load(tmp_path / "stats.safetensors")
    assert again.n_samples == stats.n_samples
    assert again.tokens == stats.tokens
    for key, t in stats.taylor.items():
        assert torch.equal(t, again.taylor[key])
    assert torch.equal(stats.layer_cos, again.layer_cos)
    assert torch.equal(stats.embedding, again.embedding)
    assert set(again.act_sq) == set(stats.act_sq)


def test_statistics_are_stored_in_bfloat16_and_summed_in_float32(setup, tmp_path):
    model, windows, full = setup
    stored = collect_statistics(model, windows, progress=False)  # the default: what a session caches
    assert STORED_DTYPE == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for table in (stored.taylor, stored.act_sum, stored.act_sq)
               for t in table.values())
    assert stored.layer_cos.dtype == stored.embedding.dtype == torch.float32  # small; clusters and depth use them
    for key, t in full.taylor.items():  # each sample's row rounded once, nothing else
        assert torch.equal(stored.taylor[key], t.to(torch.bfloat16))
    sub = stored.subset(SUBSET)
    assert all(t.dtype == torch.float32 for t in sub.taylor.values())
    for key, t in sub.act_sq.items():
        assert torch.equal(t, stored.act_sq[key][SUBSET].float().sum(0))
    # the ranking the rounding leaves: scores within bf16's precision of the fp32 ones
    for metric in ("taylor_second", "wanda_sp", "flap_fluctuation"):
        got = estimator(model, stored, windows)(Mixture.single(metric), SUBSET)
        want = estimator(model, full, windows)(Mixture.single(metric), SUBSET)
        for a, b in zip(got.mlp, want.mlp, strict=True):
            torch.testing.assert_close(a, b, rtol=2**-7, atol=0)
    stored.save(tmp_path / "bf16.safetensors")
    full.save(tmp_path / "fp32.safetensors")
    ratio = (tmp_path / "bf16.safetensors").stat().st_size / (tmp_path / "fp32.safetensors").stat().st_size
    assert ratio < 0.6


def test_loaded_statistics_are_mapped_from_the_file_not_read_into_memory(setup, tmp_path):
    _, _, stats = setup
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = PoolStatistics.load(path)
    key = next(iter(loaded.taylor))
    before = loaded.taylor[key][0, 0, 0].item()
    # Overwrite that number in the file itself: a mapped tensor sees the new bytes, a copy would not.
    raw = path.read_bytes()
    old = stats.taylor[key][0, 0, 0].reshape(1).numpy().tobytes()
    assert raw.count(old) >= 1
    assert before != 1234.5
    new = torch.tensor([1234.5], dtype=stats.taylor[key].dtype).numpy().tobytes()
    with open(path, "r+b") as f:
        for at in _find_all(raw, old):
            f.seek(at)
            f.write(new)
    assert loaded.taylor[key][0, 0, 0].item() == 1234.5


def _find_all(data: bytes, needle: bytes):
    at = data.find(needle)
    while at >= 0:
        yield at
        at = data.find(needle, at + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_summary_over_blocks_of_rows_equals_whole_matrix_sums(dtype):
    # 600 x 512 and 512 x 600 projections: the CPU goes over them in several blocks of rows
    model = make_tiny_model("qwen2", hidden_size=512, intermediate_size=600, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=128, num_hidden_layers=1).to(dtype)
    summary = WeightSummary.of(model)
    for module, linear in layer_linears(decoder_layers(model)[0]).items():
        weight, dim = linear.weight.detach().double(), 0 if module in ("o_proj", "down_proj") else 1
        l1, l2 = weight.abs().sum(dim), weight.square().sum(dim)
        if linear.bias is not None:
            l1, l2 = l1 + linear.bias.detach().double().abs(), l2 + linear.bias.detach().double().square()
        assert summary.l1[(0, module)].dtype == torch.float32
        torch.testing.assert_close(summary.l1[(0, module)].double(), l1, rtol=1e-5, atol=0)
        torch.testing.assert_close(summary.l2[(0, module)].double(), l2, rtol=1e-5, atol=0)


def test_mixture_is_normalised_weighted_sum(setup):
    model, windows, stats = setup
    shapes = model_structure(model).layers
    estimate = estimator(model, stats, windows)
    mixed = estimate(Mixture({"magnitude_l1": 3.0, "wanda_sp": 1.0}), SUBSET)
    sub = stats.subset(SUBSET)
    mag = metric_scores(model, shapes, "magnitude_l1", stats=sub)
    wanda = metric_scores(model, shapes, "wanda_sp", stats=sub)
    want = 0.75 * mag.mlp[2] / mag.mlp[2].mean() + 0.25 * wanda.mlp[2] / wanda.mlp[2].mean()
    torch.testing.assert_close(mixed.mlp[2], want)


def test_bad_inputs(setup):
    model, windows, stats = setup
    estimate = estimator(model, stats, windows)
    with pytest.raises(AdaPrunerError, match="outside the pool of 8"):
        estimate(Mixture.single("wanda_sp"), [0, 8])
    with pytest.raises(AdaPrunerError, match="repeats"):
        estimate(Mixture.single("wanda_sp"), [1, 1])
    with pytest.raises(AdaPrunerError, match="unknown importance metric"):
        Mixture({"l0": 1.0})
    with pytest.raises(AdaPrunerError, match="non-negative"):
        Mixture({"wanda_sp": -1.0})
    with pytest.raises(AdaPrunerError, match="positive weight"):
        Mixture({"wanda_sp": 0.0})
    with pytest.raises(AdaPrunerError, match="unknown aggregation"):
        Mixture.single("wanda_sp", "median")
    assert set(METRICS) - set(DECOMPOSABLE) == {"taylor_first", "llm_pruner"}  # each runs its own backward


def test_random_metric_is_seeded(setup):
    model, windows, stats = setup
    shapes = model_structure(model).layers
    a = metric_scores(model, shapes, "random", seed=1)
    assert torch.equal(a.mlp[0], metric_scores(model, shapes, "random", seed=1).mlp[0])
    assert not torch.equal(a.mlp[0], metric_scores(model, shapes, "random", seed=2).mlp[0])


def test_statistics_leave_model_untouched(setup):
    model, windows, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    collect_statistics(model, windows[:2], progress=False)
    taylor_first_exact(model, windows[:2])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_mixture_says_what_it_needs():
    assert not Mixture.single("taylor_first").needs_data
    assert Mixture.single("taylor_first").needs_backward
    assert Mixture.single("wanda_sp").needs_data
    assert not Mixture.single("wanda_sp").needs_backward
    assert not Mixture({"magnitude_l1": 1, "random": 1}).needs_data


def test_embedding_is_mean_final_hidden_state(setup):
    model, windows, stats = setup
    with torch.no_grad():
        hidden = model.model(input_ids=windows[3:4]).last_hidden_state
    torch.testing.assert_close(stats.embedding[3], hidden[0].mean(0))


def test_a_subset_is_summed_once_for_consecutive_asks(setup):
    _, _, stats = setup
    first = stats.subset(SUBSET)
    assert stats.subset(list(SUBSET)) is first  # a trial's importance and its layer similarities share one sum
    other = stats.subset([0, 1])
    assert other is not first and other.tokens != first.tokens
    fresh = stats.subset(SUBSET)
    assert fresh is not first  # only the last subset is kept
    torch.testing.assert_close(fresh.layer_cos, first.layer_cos, rtol=0, atol=0)
