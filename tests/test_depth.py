"""Depth pruning: whole decoder layers dropped by block influence, applied, exported and reloaded."""

import pytest
import torch
from helpers import make_tiny_model, mask_model
from transformers import AutoModelForCausalLM

from adapruner.errors import AdaPrunerError
from adapruner.export import load_pruned, save_pruned
from adapruner.importance import GroupScores
from adapruner.plan import Allocation, LayerPlan, PruningPlan, make_plan
from adapruner.prune import prune_model
from adapruner.repair import Repair, collect_moments, kept_columns, repair_pruned
from adapruner.structure import decoder_layers, model_structure

COS = torch.tensor([0.2, 0.9, 0.5, 0.95, 0.4, 0.6])  # layers 3 and 1 change their input least


@pytest.fixture
def model():
    return make_tiny_model(num_hidden_layers=6, intermediate_size=160, seed=5)


def scores(structure, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GroupScores([torch.rand(s.n_groups, generator=g) for s in structure.layers],
                       [torch.rand(s.n_channels, generator=g) for s in structure.layers])


def ids(seed=0, length=12):
    return torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(seed))


def logits(model, seed=0):
    with torch.no_grad():
        return model(input_ids=ids(seed)).logits


def test_the_layers_of_lowest_block_influence_are_dropped():
    assert Allocation(drop_layers=2).dropped(6, COS) == (1, 3)


def test_no_layer_is_dropped_by_default():
    assert Allocation().dropped(6, COS) == ()


def test_dropping_every_layer_is_refused():
    with pytest.raises(AdaPrunerError, match="at least one must stay"):
        Allocation(drop_layers=6).dropped(6, COS)


def test_a_negative_drop_count_is_refused():
    with pytest.raises(AdaPrunerError, match="drop_layers"):
        Allocation(drop_layers=-1)


def test_dropped_layers_count_towards_the_target(model):
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    assert plan.dropped == (1, 3)
    assert abs(plan.removed_params - round(0.3 * structure.total_params)) <= structure.layers[0].channel_params


def test_width_is_taken_only_from_the_layers_that_stay(model):
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    assert [len(plan.layers[i].keep_channels) for i in plan.dropped] == [structure.layers[i].n_channels
                                                                         for i in plan.dropped]


def test_a_drop_larger_than_the_target_is_refused(model):
    structure = model_structure(model)
    with pytest.raises(AdaPrunerError, match="more than the target"):
        make_plan(structure, scores(structure), 0.05, Allocation(drop_layers=3), COS)


def test_plan_sizes_list_only_the_layers_that_stay(model):
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    assert len(plan.sizes()) == 4


def test_pruned_parameter_count_matches_the_plan(model):
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    pruned = prune_model(model, plan)
    assert sum(p.numel() for p in pruned.parameters()) == structure.total_params - plan.removed_params


def test_dropping_layers_equals_zeroing_their_output(model):
    """A dropped layer is the same as one whose o_proj and down_proj are zero (it passes its input on)."""
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    torch.testing.assert_close(logits(prune_model(model, plan)), logits(mask_model(model, plan)))


def test_the_dense_model_is_untouched(model):
    before = logits(model)
    structure = model_structure(model)
    prune_model(model, make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS))
    assert len(decoder_layers(model)) == 6
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_the_layers_that_stay_are_renumbered_for_the_kv_cache(model):
    structure = model_structure(model)
    pruned = prune_model(model, make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS))
    assert [layer.self_attn.layer_idx for layer in decoder_layers(pruned)] == [0, 1, 2, 3]


def test_generation_with_the_kv_cache_matches_full_recomputation(model):
    """Decoding step by step with the cache gives the logits of one full forward over the sequence."""
    structure = model_structure(model)
    pruned = prune_model(model, make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS))
    sequence = ids(1, 10)
    with torch.no_grad():
        full = pruned(input_ids=sequence).logits[:, -1]
        out = pruned(input_ids=sequence[:, :-1], use_cache=True)
        step = pruned(input_ids=sequence[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_config_records_the_new_depth_and_the_dense_indices_dropped(model):
    structure = model_structure(model)
    pruned = prune_model(model, make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS))
    assert (pruned.config.num_hidden_layers, pruned.config.adapruner["dropped_layers"]) == (4, [1, 3])


def test_a_second_drop_records_indices_of_the_first_dense_model(model):
    structure = model_structure(model)
    once = prune_model(model, make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS))
    shape = model_structure(once)
    keep = tuple(LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))) for s in shape.layers)
    twice = prune_model(once, PruningPlan(keep, shape.layers[0].params, shape.total_params, dropped=(2,)))
    assert twice.config.adapruner["dropped_layers"] == [1, 3, 4]  # layer 2 of [0, 2, 4, 5] is dense layer 4


@pytest.fixture
def depth_export(model, tiny_tokenizer, tmp_path):
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    pruned = prune_model(model, plan)
    return pruned, save_pruned(pruned, tiny_tokenizer, tmp_path / "depth")


def test_depth_pruned_export_reloads_with_identical_logits(depth_export):
    pruned, folder = depth_export
    reloaded, _ = load_pruned(folder)
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=0)


def test_depth_pruned_export_loads_with_transformers_auto_class(depth_export):
    pruned, folder = depth_export
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=0)


def test_uniform_width_with_dropped_layers_loads_without_remote_code(model, tiny_tokenizer, tmp_path):
    structure = model_structure(model)
    keep = tuple(LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))) for s in structure.layers)
    pruned = prune_model(model, PruningPlan(keep, 2 * structure.layers[0].params, structure.total_params, (0, 5)))
    folder = save_pruned(pruned, tiny_tokenizer, tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=0)


def test_repair_refits_each_kept_layer_by_its_dense_index(model):
    """Each layer that stays is re-fitted exactly as it would be were no layer dropped."""
    structure = model_structure(model)
    plan = make_plan(structure, scores(structure), 0.3, Allocation(drop_layers=2), COS)
    width_only = PruningPlan(plan.layers, plan.removed_params, plan.total_params)
    assert len(kept_columns(structure, plan)) >= 4  # the layers that stay are cut too
    moments = collect_moments(model, ids(2, 16), progress=False)
    deep = repair_pruned(prune_model(model, plan), model, plan, moments, Repair("pool", 1e-3))
    wide = repair_pruned(prune_model(model, width_only), model, width_only, moments, Repair("pool", 1e-3))
    for position, i in enumerate(plan.kept_layers):
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(decoder_layers(deep)[position].mlp.down_proj, name),
                                       getattr(decoder_layers(wide)[i].mlp.down_proj, name), rtol=0, atol=0)
