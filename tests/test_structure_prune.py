"""Structure, slicing and export on tiny models of every supported architecture."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny_model, mask_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from adapruner.errors import AdaPrunerError, UnsupportedModelError
from adapruner.export import load_pruned, save_pruned
from adapruner.models import load_model
from adapruner.plan import LayerPlan, PruningPlan
from adapruner.prune import prune_model
from adapruner.structure import decoder_layers, layer_linears, model_structure

ARCHS = {
    "llama": {},
    "llama-mha": {"num_key_value_heads": 4},  # no GQA: a group is one head
    "mistral": {},
    "qwen2": {},  # q/k/v biases
    "qwen3": {},  # q/k norms on head_dim
}


def arch(name):
    model_type = name.split("-")[0]
    return make_tiny_model(model_type, seed=3, **ARCHS[name])


def random_plan(model, seed=0, keep_fraction=0.6):
    structure = model_structure(model)
    g = torch.Generator().manual_seed(seed)
    layers, removed = [], 0
    for s in structure.layers:
        n_groups = max(1, round(s.n_groups * keep_fraction))
        n_channels = max(1, round(s.n_channels * keep_fraction))
        groups = sorted(torch.randperm(s.n_groups, generator=g)[:n_groups].tolist())
        channels = sorted(torch.randperm(s.n_channels, generator=g)[:n_channels].tolist())
        layers.append(LayerPlan(tuple(groups), tuple(channels)))
        removed += (s.n_groups - n_groups) * s.group_params + (s.n_channels - n_channels) * s.channel_params
    return PruningPlan(tuple(layers), removed, structure.total_params)


def logits(model, seed=0):
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(ARCHS))
def test_structure_counts_every_prunable_parameter(name):
    model = arch(name)
    structure = model_structure(model)
    counted = sum(p.numel() for layer in decoder_layers(model) for lin in layer_linears(layer).values()
                  for pname, p in lin.named_parameters() if not (pname == "bias" and lin is layer.self_attn.o_proj))
    assert structure.prunable_params == counted
    assert structure.total_params == sum(p.numel() for p in model.parameters())
    shape = structure.layers[0]
    assert shape.n_groups == model.config.num_key_value_heads
    assert shape.n_rep == model.config.num_attention_heads // model.config.num_key_value_heads


def test_unsupported_architecture_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        model_structure(model)


@pytest.mark.parametrize("name", list(ARCHS))
def test_empty_plan_is_bit_identical(name):
    model = arch(name)
    pruned = prune_model(model, PruningPlan.keep_all(model_structure(model)))
    assert torch.equal(logits(model), logits(pruned))


@pytest.mark.parametrize("name", list(ARCHS))
def test_slicing_equals_masking(name):
    model = arch(name)
    plan = random_plan(model, seed=1)
    pruned = prune_model(model, plan)
    assert sum(p.numel() for p in pruned.parameters()) == model_structure(model).total_params - plan.removed_params
    torch.testing.assert_close(logits(pruned), logits(mask_model(model, plan)), atol=1e-5, rtol=1e-5)
    # the original is untouched
    assert model_structure(model).layers[0].n_channels == model.config.intermediate_size


def test_pruned_model_generates():
    model = arch("llama")
    pruned = prune_model(model, random_plan(model, seed=2))
    out = pruned.generate(torch.tensor([[1, 7, 9]]), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)


def test_save_and_load_non_uniform(tmp_path, tiny_tokenizer):
    model = arch("qwen2")
    pruned = prune_model(model, random_plan(model, seed=4))
    assert len({(s["num_key_value_heads"], s["intermediate_size"]) for s in pruned.config.adapruner["layers"]}) >= 1
    save_pruned(pruned, tiny_tokenizer, tmp_path / "out", info={"base_model": "tiny"})
    loaded, tokenizer = load_pruned(tmp_path / "out", device="cpu")
    assert torch.equal(logits(pruned), logits(loaded))
    assert tokenizer is not None
    assert loaded.config.adapruner["base_model"] == "tiny"
    # load_model recognises a pruned folder too
    again, _ = load_model(str(tmp_path / "out"), device="cpu")
    assert torch.equal(logits(pruned), logits(again))


def test_uniform_plan_loads_with_plain_from_pretrained(tmp_path):
    model = arch("llama")
    structure = model_structure(model)
    plan = PruningPlan(
        tuple(LayerPlan((1,), tuple(range(0, s.n_channels, 2))) for s in structure.layers),
        sum(s.group_params + (s.n_channels // 2) * s.channel_params for s in structure.layers),
        structure.total_params,
    )
    pruned = prune_model(model, plan)
    save_pruned(pruned, None, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.num_key_value_heads == 1
    assert plain.config.intermediate_size == 48
    assert torch.equal(logits(pruned), logits(plain))


def test_non_uniform_sizes_refuse_plain_loading(tmp_path):
    model = arch("llama")
    structure = model_structure(model)
    layers = [LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))) for s in structure.layers]
    layers[0] = LayerPlan((0,), layers[0].keep_channels)
    pruned = prune_model(model, PruningPlan(tuple(layers), structure.layers[0].group_params, structure.total_params))
    save_pruned(pruned, None, tmp_path)
    with pytest.raises(RuntimeError, match="mismatched"):  # sizes differ per layer: plain loading refuses
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded, _ = load_pruned(tmp_path)
    assert torch.equal(logits(pruned), logits(loaded))


def test_plan_that_empties_a_layer_is_refused():
    model = arch("llama")
    structure = model_structure(model)
    layers = [LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))) for s in structure.layers]
    layers[2] = LayerPlan((), layers[2].keep_channels)
    with pytest.raises(AdaPrunerError, match="layer 2: plan would remove every attention group"):
        prune_model(model, PruningPlan(tuple(layers), 1, structure.total_params))
    layers[2] = LayerPlan((0, 7), layers[2].keep_channels)
    with pytest.raises(AdaPrunerError, match="invalid attention group index"):
        prune_model(model, PruningPlan(tuple(layers), 1, structure.total_params))


def test_pruned_copy_shares_no_tensor_with_the_original():
    model = arch("qwen2")
    pruned = prune_model(model, random_plan(model, seed=5))
    originals = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in originals for p in pruned.parameters())
    with torch.no_grad():  # writing into the copy leaves the original as it was
        before = logits(model)
        for p in pruned.parameters():
            p.add_(1.0)
        assert torch.equal(logits(model), before)



@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_shared_copy_scores_as_the_full_copy_and_owns_only_what_it_cuts(name):
    model = arch(name)
    structure = model_structure(model)
    plan = random_plan(model, seed=5)
    whole = LayerPlan(tuple(range(structure.layers[1].n_groups)), tuple(range(structure.layers[1].n_channels)))
    plan = PruningPlan(plan.layers[:1] + (whole,) + plan.layers[2:], plan.removed_params, plan.total_params)
    full, shared = prune_model(model, plan), prune_model(model, plan, share_unchanged=True)
    assert torch.equal(logits(shared), logits(full))
    originals = {p.data_ptr() for p in model.parameters()}
    assert shared.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shared.model.norm.weight.data_ptr() in originals
    assert all(p.data_ptr() in originals for p in decoder_layers(shared)[1].parameters())  # layer 1 is not cut
    for layer in (0, 2):
        for linear in layer_linears(decoder_layers(shared)[layer]).values():
            assert linear.weight.data_ptr() not in originals
    assert decoder_layers(shared)[1] is not decoder_layers(model)[1]  # modules are the copy's own
    assert len(decoder_layers(model)[0].mlp.gate_proj.weight) == structure.layers[0].n_channels


def test_the_pruned_copy_is_built_where_the_model_is():
    """No round trip through the CPU: a model on the meta device (no memory at all) prunes into one."""
    model = arch("llama").to("meta")
    for share in (False, True):
        pruned = prune_model(model, random_plan(model, seed=2), share_unchanged=share)
        assert {p.device.type for p in pruned.parameters()} == {"meta"}
        assert decoder_layers(pruned)[0].mlp.down_proj.weight.shape[1] < model_structure(model).layers[0].n_channels


LOAD_WITHOUT_ADAPRUNER = r"""
import importlib.abc, sys, torch
class NoAdaPruner(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("adapruner", "service"):
            raise ImportError(f"{name} must not be needed to load an export")
sys.meta_path.insert(0, NoAdaPruner())
from transformers import AutoModelForCausalLM
folder, again = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
model.save_pretrained(again)
reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True).eval()
ids = torch.tensor([[1, 5, 9, 2, 7]])
with torch.no_grad():
    torch.save([model(input_ids=ids).logits, reloaded(input_ids=ids).logits], sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] == "adapruner"]
"""


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_non_uniform_export_loads_with_plain_transformers_where_adapruner_is_absent(tmp_path, model_type):
    model = arch(model_type)
    structure = model_structure(model)
    layers = [LayerPlan(tuple(range(s.n_groups)), tuple(range(0, s.n_channels, 1 + i % 2)))
              for i, s in enumerate(structure.layers)]
    layers[0] = LayerPlan((1,), layers[0].keep_channels)
    pruned = prune_model(model, PruningPlan(tuple(layers), 1, structure.total_params))
    sizes = pruned.config.adapruner["layers"]
    assert any(s != sizes[0] for s in sizes), "the plan must give the layers different sizes"
    save_pruned(pruned, None, tmp_path / "export", info={"base_model": "tiny", "removed_share": 0.2})
    assert (tmp_path / "export" / "modeling_pruned.py").is_file()
    card = (tmp_path / "export" / "README.md").read_text()
    assert 'from_pretrained("export", trust_remote_code=True)' in card
    assert "20.00% of all" in card
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_ADAPRUNER, str(tmp_path / "export"),
                             str(tmp_path / "again"), str(tmp_path / "logits.pt")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, reloaded = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = pruned(input_ids=torch.tensor([[1, 5, 9, 2, 7]])).logits
    assert torch.equal(loaded, expected)
    assert torch.equal(reloaded, expected)


def test_a_uniform_export_needs_no_code(tmp_path):
    model = arch("llama")
    structure = model_structure(model)
    plan = PruningPlan(tuple(LayerPlan((1,), tuple(range(0, s.n_channels, 2))) for s in structure.layers),
                       1, structure.total_params)
    save_pruned(prune_model(model, plan), None, tmp_path)
    assert not (tmp_path / "modeling_pruned.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert 'from_pretrained("' in (tmp_path / "README.md").read_text()


def test_the_standalone_modeling_file_speaks_the_layout_of_structure():
    from adapruner import modeling_pruned, structure

    assert modeling_pruned.ATTENTION == structure.ATTN_MODULES
    assert modeling_pruned.INPUT_SIDE == structure.COLUMN_MODULES
    assert set(modeling_pruned.PRUNED_CLASSES) == set(structure.SUPPORTED_MODEL_TYPES)


def test_an_export_in_bf16_holds_bf16_weights_and_says_so(tiny_tokenizer, tmp_path):
    model = arch("llama")
    folder = save_pruned(prune_model(model, random_plan(model)), tiny_tokenizer, tmp_path / "bf16",
                         dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_an_export_in_bf16_is_the_model_rounded_to_bf16(tiny_tokenizer, tmp_path):
    model = arch("llama")
    pruned = prune_model(model, random_plan(model))
    folder = save_pruned(pruned, tiny_tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    reloaded, _ = load_pruned(folder, dtype=torch.float32)
    rounded = {name: p.to(torch.bfloat16).float() for name, p in pruned.named_parameters()}
    assert all(torch.equal(p, rounded[name]) for name, p in reloaded.named_parameters())


def test_an_export_keeps_the_models_dtype_unless_told(tiny_tokenizer, tmp_path):
    model = arch("llama")
    folder = save_pruned(prune_model(model, random_plan(model)), tiny_tokenizer, tmp_path / "same")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"


def test_the_export_dtype_defaults_to_the_released_one():
    from adapruner.models import export_dtype

    assert export_dtype("auto", "smollm2-135m", arch("llama")) == torch.bfloat16


def test_the_export_dtype_of_an_unknown_origin_is_the_models_own():
    from adapruner.models import export_dtype

    assert export_dtype(None, "some/hub-id", arch("llama")) == torch.float32


def test_a_named_export_dtype_wins():
    from adapruner.models import export_dtype

    assert export_dtype("float16", "smollm2-135m", arch("llama")) == torch.float16
