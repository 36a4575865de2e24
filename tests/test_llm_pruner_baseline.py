"""The ``llm-pruner`` baseline removes the groups LLM-Pruner's own code removes.

The reference below is written from LLM-Pruner's code (``llama3.py`` block-wise with
``TaylorImportance(group_reduction="sum", taylor="param_first")`` and ``MetaPruner``), not from ours:
the model in float16 (``llama3.py`` loads it so); one backward over the calibration batch; per
dependency of a group the element-wise ``|w * g|`` summed over each output row (q/k/v/gate/up) or
input column (o/down); every dependency's vector folded onto the root's channels by
``imp.view(len(imp) // min_len, min_len).sum(0)``; summed over the dependencies; consecutive
``head_dim`` channels summed into one KV group; the lowest removed.
"""

import copy

import pytest
import torch
from helpers import make_documents, make_tiny_model

from adapruner.data import build_pool, split_documents
from adapruner.importance import Mixture
from adapruner.search import baseline_config
from adapruner.session import PruneConfig, PruningSession
from adapruner.statistics import HalfMatmulInFloat32
from adapruner.structure import decoder_layers

RATIO = 0.5  # LLM-Pruner's per-layer ratio: 1 of 2 KV groups, 48 of 96 MLP channels


def llm_pruner_reference(model, windows, layers, ratio, mlp_scores=None):
    """{layer: (removed KV groups, removed MLP channels)} as LLM-Pruner's code chooses them (and, into
    ``mlp_scores``, each layer's MLP channel importance)."""
    model = copy.deepcopy(model).half()
    model(input_ids=windows, labels=windows).loss.backward()
    head_dim = model.config.head_dim
    chosen = {}
    for i in layers:
        layer = decoder_layers(model)[i]
        attn, mlp = layer.self_attn, layer.mlp
        rows = lambda lin: (lin.weight * lin.weight.grad).abs().sum(1)  # noqa: E731
        cols = lambda lin: (lin.weight * lin.weight.grad).abs().sum(0)  # noqa: E731
        deps = [rows(attn.k_proj), rows(attn.q_proj), rows(attn.v_proj), cols(attn.o_proj)]
        root = min(len(d) for d in deps)
        channel_imp = torch.stack([d.view(len(d) // root, root).sum(0) for d in deps]).sum(0)
        group_imp = channel_imp.view(-1, head_dim).sum(1)
        n_channels = root - int(root * (1 - ratio))  # MetaPruner's count, in root channels
        groups = torch.argsort(group_imp)[: n_channels // head_dim]
        mlp_imp = torch.stack([rows(mlp.gate_proj), rows(mlp.up_proj), cols(mlp.down_proj)]).sum(0)
        if mlp_scores is not None:
            mlp_scores[i] = mlp_imp.float()
        width = mlp_imp.numel()
        channels = torch.argsort(mlp_imp)[: width - int(width * (1 - ratio))]
        chosen[i] = (sorted(groups.tolist()), sorted(channels.tolist()))
    return chosen


def removed(plan, structure, layers):
    return {i: (sorted(set(range(structure.layers[i].n_groups)) - set(plan.layers[i].keep_groups)),
                sorted(set(range(structure.layers[i].n_channels)) - set(plan.layers[i].keep_channels)))
            for i in layers}


@pytest.fixture(scope="module")
def session(tiny_tokenizer):
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tiny_tokenizer, [(source, 16)], seq_len=32)
    model = make_tiny_model(seed=3, num_hidden_layers=8)
    return PruningSession(model, tiny_tokenizer, pool, [source], progress=False, cache_statistics=False)


@pytest.fixture(scope="module")
def baseline(session):
    config = baseline_config("llm-pruner", session, seed=0)
    layers = config.allocation.layer_range(len(session.structure.layers))
    shape = session.structure.layers[0]
    per_layer = shape.group_params + (shape.n_channels - int(shape.n_channels * (1 - RATIO))) * shape.channel_params
    return config, layers, session.plan(config, per_layer * len(layers))


def test_the_baseline_spares_llm_pruners_layers(baseline):
    _, layers, _ = baseline
    assert layers == range(2, 7)  # 8 layers: the first quarter and the last eighth, as 4 and 2 of 32


def test_the_baseline_calibrates_on_ten_random_samples(baseline):
    config, _, _ = baseline
    assert len(config.subset) == 10


def test_the_baseline_removes_llm_pruners_groups(session, baseline):
    """The same arithmetic as LLM-Pruner's float16 run on a GPU: float16 matrix products accumulated in
    float32 (which is also how our baseline computes them on a CPU, see ``HalfMatmulInFloat32``)."""
    config, layers, plan = baseline
    with HalfMatmulInFloat32():
        reference = llm_pruner_reference(session.model, session.pool.windows[list(config.subset)], layers, RATIO)
    assert removed(plan, session.structure, layers) == reference


def test_against_cpu_float16_kernels_only_ties_within_float16_rounding_differ(session, baseline):
    """PyTorch's native CPU float16 matrix products sum in another order: the same KV groups, and any
    MLP channel chosen differently is a tie at float16 precision with the last channel removed."""
    config, layers, plan = baseline
    scores = {}
    reference = llm_pruner_reference(session.model, session.pool.windows[list(config.subset)], layers, RATIO, scores)
    ours = removed(plan, session.structure, layers)
    for i in layers:
        assert ours[i][0] == reference[i][0]
        threshold = scores[i][reference[i][1]].max()
        for channel in set(ours[i][1]) ^ set(reference[i][1]):
            assert abs(scores[i][channel] - threshold) <= 4 * 2**-10 * threshold, (i, channel)


def test_the_reference_differs_from_crediting_heads_to_their_own_group(session, baseline):
    """Guard: on this model LLM-Pruner's alignment of query heads changes a choice, so the test above
    tells the two apart."""
    config, layers, plan = baseline
    grouped = PruneConfig(Mixture.single("taylor_first"), config.subset, config.allocation)
    ours = session.plan(grouped, plan.removed_params)
    assert removed(ours, session.structure, layers) != removed(plan, session.structure, layers)
