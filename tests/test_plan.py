import pytest
import torch
from helpers import make_tiny_model

from adapruner.errors import AdaPrunerError
from adapruner.importance import GroupScores
from adapruner.plan import Allocation, layer_counts, make_plan, params_to_remove
from adapruner.structure import model_structure


@pytest.fixture
def structure():
    # 8 layers, 4 groups of 1 KV + 2 query heads, 160 channels: enough room for allocation tests
    model = make_tiny_model(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                            intermediate_size=160)
    return model_structure(model)


def scores(structure, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GroupScores([torch.rand(s.n_groups, generator=g) for s in structure.layers],
                       [torch.rand(s.n_channels, generator=g) for s in structure.layers])


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.35])
@pytest.mark.parametrize("allocation", [
    Allocation.named("uniform"), Allocation.named("layer_range", first=2, last=-1),
    Allocation.named("adaptive", strength=0.8), Allocation.named("uniform", attn_share=0.0),
    Allocation.named("layer_range", first=1, last=7, attn_share=0.6), Allocation(1, -1, 0.5, 0.3),
])
def test_plan_hits_target_within_one_channel(structure, ratio, allocation):
    cos = torch.linspace(0.5, 0.95, len(structure.layers))
    plan = make_plan(structure, scores(structure), ratio, allocation, layer_cos=cos)
    target = round(ratio * structure.total_params)
    assert abs(plan.removed_params - target) <= structure.layers[0].channel_params
    kept = sum(len(lp.keep_groups) * s.group_params + len(lp.keep_channels) * s.channel_params
               for lp, s in zip(plan.layers, structure.layers, strict=True))
    assert structure.prunable_params - kept == plan.removed_params
    assert all(lp.keep_groups and lp.keep_channels for lp in plan.layers)


def test_parameter_count_target(structure):
    plan = make_plan(structure, scores(structure), 20_000)
    assert abs(plan.removed_params - 20_000) <= structure.layers[0].channel_params


def test_layer_range_spares_outer_layers(structure):
    plan = make_plan(structure, scores(structure), 0.2, Allocation.named("layer_range", first=2, last=-2))
    sizes = plan.sizes()
    full = {"num_key_value_heads": 4, "intermediate_size": 160}
    assert sizes[:2] == [full, full]
    assert sizes[-2:] == [full, full]
    assert all(s != full for s in sizes[2:-2])


def test_attn_share_zero_keeps_all_heads(structure):
    plan = make_plan(structure, scores(structure), 0.2, Allocation(attn_share=0.0))
    assert all(s["num_key_value_heads"] == 4 for s in plan.sizes())


def test_adaptive_prunes_less_where_layers_change_input_more(structure):
    # layer 0 changes its input most (lowest cosine), layer 7 least
    cos = torch.linspace(0.2, 0.99, len(structure.layers))
    counts = layer_counts(structure, params_to_remove(structure, 0.2), Allocation.named("adaptive", strength=0.9), cos)
    removed = [g * structure.layers[0].group_params + c * structure.layers[0].channel_params for g, c in counts]
    assert removed[0] < removed[-1]
    assert removed == sorted(removed) or removed[0] < 0.5 * removed[-1]


def test_lowest_scores_are_removed(structure):
    s = scores(structure, seed=3)
    plan = make_plan(structure, s, 0.2, Allocation(attn_share=0.0))
    for lp, mlp in zip(plan.layers, s.mlp, strict=True):
        dropped = sorted(set(range(mlp.numel())) - set(lp.keep_channels))
        if dropped:
            assert mlp[dropped].max() <= mlp[list(lp.keep_channels)].min()


def test_bad_targets(structure):
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(AdaPrunerError, match="ratio|target"):
            make_plan(structure, scores(structure), bad)
    with pytest.raises(AdaPrunerError, match="cannot remove"):
        make_plan(structure, scores(structure), 10**9)
    with pytest.raises(AdaPrunerError, match="without emptying"):
        make_plan(structure, scores(structure), 0.75, Allocation.named("layer_range", first=3, last=5))
    with pytest.raises(AdaPrunerError, match="unknown allocation"):
        Allocation.named("cubic")
    with pytest.raises(AdaPrunerError, match="strength"):
        Allocation(strength=1.5)
    with pytest.raises(AdaPrunerError, match="empty"):
        make_plan(structure, scores(structure), 0.1, Allocation.named("layer_range", first=5, last=3))
    with pytest.raises(AdaPrunerError, match="cosine"):
        make_plan(structure, scores(structure), 0.1, Allocation.named("adaptive"))


def test_adaptive_within_a_layer_range(structure):
    cos = torch.linspace(0.2, 0.99, len(structure.layers))
    plan = make_plan(structure, scores(structure), 0.15, Allocation(first=1, last=-1, strength=0.7), layer_cos=cos)
    sizes = plan.sizes()
    assert sizes[0]["intermediate_size"] == 160
    assert sizes[-1]["intermediate_size"] == 160
    assert sizes[1]["intermediate_size"] > sizes[-2]["intermediate_size"]


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_kept_channels_are_multiples_of_the_grid(structure, ratio):
    plan = make_plan(structure, scores(structure), ratio, Allocation(), channel_multiple=32)
    assert {len(lp.keep_channels) % 32 for lp in plan.layers} == {0}


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_rounded_plan_meets_the_target_within_one_step(structure, ratio):
    plan = make_plan(structure, scores(structure), ratio, Allocation(), channel_multiple=32)
    step = 32 * structure.layers[0].channel_params
    assert abs(plan.removed_params - round(ratio * structure.total_params)) <= step


def test_a_layer_off_the_grid_keeps_channel_steps(structure):
    """160 channels are no multiple of 64: the layers keep any count, and the target holds within a channel."""
    plan = make_plan(structure, scores(structure), 0.2, Allocation(), channel_multiple=64)
    assert abs(plan.removed_params - round(0.2 * structure.total_params)) <= structure.layers[0].channel_params
