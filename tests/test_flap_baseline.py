"""The ``flap`` and ``wanda-sp`` baselines remove what FLAP's own code removes.

The references below are written from FLAP's ``lib/prune.py`` (CASIA-IVA-Lab/FLAP at 3bb57db), not from
ours, with the GQA adaptation docs/results.md describes (a KV group's ``n_rep * head_dim`` o_proj columns
take the place of a head's 128; a layer's heads are its KV groups):

* ``prune_flap`` with ``--metrics WIFV --structure AL-AM``: the fluctuation of each o_proj/down_proj input
  column (its variance over the calibration tokens; FLAP keeps a running estimate, the exact one here) times
  the column's sum of squared weights, squared for o_proj; standardised over each layer's columns; a group's
  score the mean of its columns'; every unit of every layer sorted by score, descending, an attention unit
  weighing ``group params / channel params`` channels; the threshold where the weights' running sum comes
  closest to ``(1 - ratio)`` of their total; a unit is kept when its score is above it; then ``compress``
  adds the removed columns' mean input times their weights as o_proj's and down_proj's bias.
* ``prune_wanda_sp``: layer by layer, the layer's inputs taken from the layers below as already pruned;
  ``|W| * sqrt(mean x²)`` of o_proj and down_proj columns, averaged over the rows, summed over a group's
  columns; the lowest ``int(ratio * heads)`` groups and ``int(ratio * channels)`` channels removed.
"""

import copy

import pytest
import torch
from helpers import make_documents, make_tiny_model

from adapruner.data import build_pool, split_documents
from adapruner.export import load_pruned, save_pruned
from adapruner.importance import Mixture
from adapruner.plan import Allocation, global_counts, params_to_remove
from adapruner.repair import first_layer_inputs
from adapruner.search import baseline_config
from adapruner.session import PruneConfig, PruningSession
from adapruner.structure import decoder_layers, layer_linears, model_structure

RATIO = 0.5


@pytest.fixture(scope="module")
def session(tiny_tokenizer):
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tiny_tokenizer, [(source, 16)], seq_len=32)
    model = make_tiny_model(seed=11, num_hidden_layers=6)
    return PruningSession(model, tiny_tokenizer, pool, [source], progress=False, cache_statistics=False)


def column_inputs(layer, hidden, kwargs):
    """Inputs of ``layer``'s o_proj and down_proj over every token, as ``[tokens, columns]``."""
    seen = {"o_proj": [], "down_proj": []}
    linears = layer_linears(layer)
    hooks = [linears[m].register_forward_pre_hook(
        lambda _mod, args, m=m: seen[m].append(args[0].detach().flatten(0, -2))) for m in seen]
    outputs = [layer(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
    for hook in hooks:
        hook.remove()
    return {m: torch.cat(x) for m, x in seen.items()}, [o[0] if isinstance(o, tuple) else o for o in outputs]


def layer_inputs(model, windows):
    """The first decoder layer's inputs (hidden states and keyword arguments), one window at a time."""
    return first_layer_inputs(model, [w[None] for w in windows])


@torch.no_grad()
def flap_reference(model, windows, ratio):
    """(kept groups, kept channels, o_proj bias, down_proj bias) per layer, as prune_flap (AL-AM, WIFV) makes them."""
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    width = n_rep * config.head_dim  # a KV group's o_proj columns (FLAP: a head's 128)
    hidden, kwargs = layer_inputs(model, windows)
    attn_metric, mlp_metric, means = [], [], []
    for layer in decoder_layers(model):
        inputs, hidden = column_inputs(layer, hidden, kwargs)  # AL-AM prunes nothing until every layer is scored
        lin = layer_linears(layer)
        wifv = {m: inputs[m].var(0, unbiased=False) * lin[m].weight.pow(2).sum(0) for m in inputs}
        attn_metric.append(wifv["o_proj"] ** 2)
        mlp_metric.append(wifv["down_proj"])
        means.append({m: inputs[m].mean(0) for m in inputs})
    standardise = lambda x: (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)  # noqa: E731
    attn = standardise(torch.stack(attn_metric)).reshape(len(attn_metric), -1, width).mean(2)
    mlp = standardise(torch.stack(mlp_metric))
    prune_metric = torch.cat([attn.view(-1), mlp.view(-1)])
    sorted_prune, indices = torch.sort(prune_metric, descending=True)
    weight = torch.ones_like(indices, dtype=torch.float64)
    hidden_size = config.hidden_size
    weight[indices < attn.numel()] = (2 * n_rep + 2) * config.head_dim * hidden_size / (3 * hidden_size)
    position = torch.argmin(torch.abs(torch.cumsum(weight, 0) - weight.sum() * (1 - ratio)))
    threshold = sorted_prune[position]
    attn_mask, mlp_mask = attn > threshold, mlp > threshold
    result = []
    for i, layer in enumerate(decoder_layers(model)):
        lin = layer_linears(layer)
        o_mask = attn_mask[i].repeat_interleave(width)
        o_bias = (means[i]["o_proj"] * ~o_mask) @ lin["o_proj"].weight.T
        d_bias = (means[i]["down_proj"] * ~mlp_mask[i]) @ lin["down_proj"].weight.T
        result.append((attn_mask[i].nonzero().flatten().tolist(), mlp_mask[i].nonzero().flatten().tolist(),
                       o_bias, d_bias))
    return result


@torch.no_grad()
def wanda_sp_reference(model, windows, ratio):
    """(kept groups, kept channels) per layer, as prune_wanda_sp chooses them."""
    model = copy.deepcopy(model)
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    width = n_rep * config.head_dim
    hidden, kwargs = layer_inputs(model, windows)
    kept = []
    for layer in decoder_layers(model):
        inputs, _ = column_inputs(layer, hidden, kwargs)
        lin = layer_linears(layer)
        metric = {m: (lin[m].weight.abs() * inputs[m].pow(2).sum(0).div(len(windows)).sqrt()[None]).mean(0)
                  for m in inputs}
        heads = metric["o_proj"].reshape(-1, width).sum(1)
        head_mask = heads >= torch.sort(heads)[0][int(ratio * config.num_key_value_heads)]
        channels = metric["down_proj"]
        channel_mask = channels >= torch.sort(channels)[0][int(channels.numel() * ratio)]
        for name, mask in (("q_proj", head_mask.repeat_interleave(width)),
                           ("o_proj", head_mask.repeat_interleave(width)),
                           ("k_proj", head_mask.repeat_interleave(config.head_dim)),
                           ("v_proj", head_mask.repeat_interleave(config.head_dim)),
                           ("gate_proj", channel_mask), ("up_proj", channel_mask), ("down_proj", channel_mask)):
            if name in ("o_proj", "down_proj"):
                lin[name].weight[:, ~mask] = 0  # FLAP's unstr mode: masked, the same outputs as removed
            else:
                lin[name].weight[~mask] = 0
        _, hidden = column_inputs(layer, hidden, kwargs)  # the pruned layer's outputs feed the next one
        kept.append((head_mask.nonzero().flatten().tolist(), channel_mask.nonzero().flatten().tolist()))
    return kept


def reference_removes(structure, kept) -> int:
    return sum((s.n_groups - len(g)) * s.group_params + (s.n_channels - len(c)) * s.channel_params
               for s, (g, c, *_) in zip(structure.layers, kept, strict=True))


def test_flap_removes_flaps_groups_and_channels_and_adds_its_bias(session):
    reference = flap_reference(session.model, session.pool.windows, RATIO)
    target = reference_removes(session.structure, reference)
    config = baseline_config("flap", session)
    pruned, plan = session.prune(config, target)
    assert plan.removed_params == target
    assert [list(lp.keep_groups) for lp in plan.layers] == [g for g, *_ in reference]
    assert [list(lp.keep_channels) for lp in plan.layers] == [c for _, c, *_ in reference]
    assert any(len(lp.keep_groups) < s.n_groups for lp, s in zip(plan.layers, session.structure.layers, strict=True))
    for layer, (_, _, o_bias, d_bias) in zip(decoder_layers(pruned), reference, strict=True):
        lin = layer_linears(layer)
        torch.testing.assert_close(lin["o_proj"].bias, o_bias, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lin["down_proj"].bias, d_bias, rtol=1e-4, atol=1e-6)


def test_flaps_ranking_spreads_the_cut_unevenly_over_layers(session):
    plan = session.plan(baseline_config("flap", session), RATIO)
    kept = [len(lp.keep_channels) for lp in plan.layers]
    assert max(kept) - min(kept) > 4  # one ranking of every unit, not the same share of every layer


def test_wanda_sp_removes_what_flaps_code_removes_layer_by_layer(session):
    reference = wanda_sp_reference(session.model, session.pool.windows, RATIO)
    target = reference_removes(session.structure, reference)
    assert target == RATIO * session.structure.prunable_params  # 1 of 2 groups and 48 of 96 channels per layer
    plan = session.plan(baseline_config("wanda-sp", session, target=target), target)
    assert [list(lp.keep_groups) for lp in plan.layers] == [g for g, _ in reference]
    assert [list(lp.keep_channels) for lp in plan.layers] == [c for _, c in reference]


def test_wanda_sp_layer_by_layer_differs_from_the_dense_statistics(session):
    """Scored on the pruned layers' activations, the later layers choose otherwise than from the dense model's."""
    target = 0.3
    sequential = session.plan(baseline_config("wanda-sp", session, target=target), target)
    dense_config = baseline_config("wanda-sp", session, target=target)
    dense = session.plan(PruneConfig(Mixture.single("wanda_sp", "last"), dense_config.subset, dense_config.allocation),
                         target)
    assert sequential.layers[0] == dense.layers[0]  # the first layer sees the same inputs either way
    assert sequential.layers[1:] != dense.layers[1:]
    assert sequential.removed_params == dense.removed_params


def test_a_global_ranking_meets_the_target_within_a_channel_and_empties_no_layer(session):
    structure = session.structure
    scores = session.importance(baseline_config("flap", session))
    for ratio in (0.1, 0.3, 0.6):
        n_remove = params_to_remove(structure, ratio)
        counts = global_counts(structure, scores, n_remove, range(len(structure.layers)))
        removed = sum(g * s.group_params + c * s.channel_params for (g, c), s in zip(counts, structure.layers,
                                                                                      strict=True))
        assert abs(removed - n_remove) <= structure.layers[0].channel_params / 2
        assert all(g < s.n_groups and c < s.n_channels for (g, c), s in zip(counts, structure.layers, strict=True))


def test_a_global_ranking_within_a_layer_range_spares_the_other_layers(session):
    config = baseline_config("flap", session)
    ranged = type(config)(config.mixture, config.subset, Allocation(first=2, last=-1, scope="global"))
    plan = session.plan(ranged, 0.2)
    shapes = session.structure.layers
    for i in (0, 1, 5):
        assert len(plan.layers[i].keep_groups) == shapes[i].n_groups
        assert len(plan.layers[i].keep_channels) == shapes[i].n_channels


def test_a_plan_from_flap_loads_back_with_its_bias(session, tmp_path):
    pruned, _ = session.prune(baseline_config("flap", session), 0.3)
    save_pruned(pruned, session.tokenizer, tmp_path / "m")
    loaded, _ = load_pruned(tmp_path / "m")
    ids = session.pool.windows[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits)
    assert model_structure(loaded).total_params == model_structure(pruned).total_params
