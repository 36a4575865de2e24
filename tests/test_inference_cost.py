"""Measured inference cost: throughput and memory of the tiny model, its timing on a fake clock, the
KV-cached decode loop, pruned and smaller models, and the ``bench-model`` command."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tiny_model

import adapruner.inference_cost as inference_cost
from adapruner.errors import AdaPrunerError
from adapruner.export import save_pruned
from adapruner.inference_cost import (
    InferenceCost,
    measure_cost,
    measure_folder,
    measure_interleaved,
    ratio_spread,
    ratio_text,
    speedups,
)
from adapruner.plan import LayerPlan, PruningPlan
from adapruner.prune import prune_model
from adapruner.structure import model_structure
from service.cli import main

FAST = dict(prefill_shapes=((2, 16),), new_tokens=4, prompt_tokens=4, repeats=1, warmup=0)


def record_forwards(model):
    """Each forward call's input shape and the length its KV cache had on entry (None without one)."""
    calls = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((tuple(kwargs["input_ids"].shape), None if cache is None else cache.get_seq_length()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_the_tiny_model_costs_positive_finite_amounts(tiny_model):
    cost = measure_cost(tiny_model, prefill_shapes=((1, 32), (4, 8)), new_tokens=6, repeats=2)
    n_params = sum(p.numel() for p in tiny_model.parameters())
    assert (cost.device, cost.dtype, cost.threads) == ("cpu", "float32", torch.get_num_threads())
    assert cost.parameters == n_params
    assert cost.weight_bytes == 4 * n_params
    assert cost.disk_bytes is None
    assert list(cost.prefill_tokens_per_s) == ["1x32", "4x8"]
    for rate in [*cost.prefill_tokens_per_s.values(), cost.decode_tokens_per_s]:
        assert 0 < rate < math.inf
    assert cost.peak_memory_bytes >= cost.weight_bytes


def test_tied_weights_are_counted_once():
    model = make_tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cost = measure_cost(model, **FAST)
    assert cost.parameters == sum(p.numel() for p in model.parameters())
    assert cost.parameters == make_tiny_model().num_parameters() - model.lm_head.weight.numel()


def test_decode_feeds_one_token_at_a_time_through_the_kv_cache(tiny_model):
    calls = record_forwards(tiny_model)
    measure_cost(tiny_model, prefill_shapes=((2, 16),), new_tokens=5, prompt_tokens=3, repeats=2, warmup=1)
    prefill = [((2, 16), None)]
    decode = [((1, 3), None), ((1, 1), 3), ((1, 1), 4), ((1, 1), 5), ((1, 1), 6)]  # prompt, then 4 cached steps
    assert calls == prefill + decode + prefill * 2 + decode * 2  # the warmup, then 2 timed runs of each


def test_only_the_decode_steps_are_timed_and_the_median_is_taken(tiny_model, monkeypatch):
    # a clock that advances one second per forward pass, two in the second of each measurement's 3 runs
    now, runs = [0.0], []

    def tick(module, args, kwargs):
        now[0] += 2.0 if len(runs) % 3 == 2 else 1.0

    tiny_model.register_forward_pre_hook(tick, with_kwargs=True)
    monkeypatch.setattr(inference_cost, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    timed = inference_cost._timed
    monkeypatch.setattr(inference_cost, "_timed", lambda fn, device: runs.append(1) or timed(fn, device))
    cost = measure_cost(tiny_model, prefill_shapes=((2, 16),), new_tokens=5, prompt_tokens=3, repeats=3, warmup=0)
    assert cost.prefill_tokens_per_s == {"2x16": 32 / 1.0}  # runs of 1, 2 and 1 seconds: the median
    # decode runs take 4, 8 and 4 seconds for their 4 cached steps (timing the prompt's pass too gives 5, 10, 5)
    assert cost.decode_tokens_per_s == pytest.approx(4 / 4.0)


def test_the_same_ids_feed_every_model():
    seen = []
    for seed in (0, 1):  # two different models
        model = make_tiny_model(seed=seed)
        model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
        measure_cost(model, **FAST)
    inputs = [ids for ids in seen if ids.shape[1] > 1]  # the prefill and the prompt (the rest is generated)
    assert [tuple(ids.shape) for ids in inputs] == [(2, 16), (1, 4)] * 2
    assert all(torch.equal(a, b) for a, b in zip(inputs[:2], inputs[2:], strict=True))
    assert not torch.equal(inputs[0][0], inputs[0][1])  # random ids, not one token repeated


def test_prefill_is_clamped_to_the_model_positions_and_decode_must_fit():
    model = make_tiny_model(max_position_embeddings=16)
    cost = measure_cost(model, prefill_shapes=((1, 64), (2, 8)), new_tokens=4, prompt_tokens=4, repeats=1)
    assert list(cost.prefill_tokens_per_s) == ["1x16", "2x8"]
    measure_cost(model, prefill_shapes=(), new_tokens=9, prompt_tokens=8, repeats=1)  # positions 0..15
    with pytest.raises(AdaPrunerError, match="exceed the model's 16 positions"):
        measure_cost(model, prefill_shapes=(), new_tokens=10, prompt_tokens=8, repeats=1)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak resident set needs Linux /proc")
def test_cpu_peak_memory_is_the_weights_and_what_the_measurement_allocated():
    memory = inference_cost.PeakMemory(torch.device("cpu"))
    block = torch.ones(16 * 2**20)  # 64 MiB, written so every page is resident
    del block
    assert 48 * 2**20 < memory.peak_bytes(0) < 96 * 2**20  # other memory may come and go meanwhile
    assert memory.peak_bytes(10**9) - memory.peak_bytes(0) == 10**9
    fresh = inference_cost.PeakMemory(torch.device("cpu"))  # the reset forgets the earlier peak
    assert fresh.peak_bytes(0) < 32 * 2**20


def test_the_model_keeps_its_training_mode(tiny_model):
    tiny_model.train()
    modes = []
    tiny_model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    measure_cost(tiny_model, **FAST)
    assert modes and not any(modes)
    assert tiny_model.training


def test_a_smaller_model_costs_less_and_speedups_say_so(tiny_model):
    unpruned = measure_cost(tiny_model, **FAST)
    half = measure_cost(make_tiny_model(num_hidden_layers=2), **FAST)
    assert half.parameters < unpruned.parameters
    assert half.weight_bytes < unpruned.weight_bytes
    ratios = speedups({"unpruned": unpruned, "half": half})
    assert ratios["unpruned"] == {"decode": 1.0, "prefill_2x16": 1.0, "parameters": 1.0, "peak_memory": 1.0}
    assert ratios["half"]["parameters"] == half.parameters / unpruned.parameters
    assert ratios["half"]["decode"] == half.decode_tokens_per_s / unpruned.decode_tokens_per_s
    with pytest.raises(KeyError, match="'base'"):
        speedups({"unpruned": unpruned}, reference="base")


def test_a_pruned_export_is_measured_from_its_folder(tmp_path, tiny_model, tiny_tokenizer):
    structure = model_structure(tiny_model)
    g = torch.Generator().manual_seed(0)
    layers, removed = [], 0
    for i, s in enumerate(structure.layers):  # sizes differ by layer: only the pruned class loads it
        n_channels = s.n_channels // 2 + i
        layers.append(LayerPlan(tuple(sorted(torch.randperm(s.n_groups, generator=g)[:1].tolist())),
                                tuple(sorted(torch.randperm(s.n_channels, generator=g)[:n_channels].tolist()))))
        removed += (s.n_groups - 1) * s.group_params + (s.n_channels - n_channels) * s.channel_params
    pruned = prune_model(tiny_model, PruningPlan(tuple(layers), removed, structure.total_params))
    save_pruned(pruned, tiny_tokenizer, tmp_path / "pruned")
    cost = measure_folder(tmp_path / "pruned", device="cpu", **FAST)
    assert cost.parameters == sum(p.numel() for p in pruned.parameters()) < structure.total_params
    assert cost.disk_bytes == sum(f.stat().st_size for f in (tmp_path / "pruned").glob("*.safetensors")) > 0
    assert cost.decode_tokens_per_s > 0


def test_the_cost_round_trips_through_json(tiny_model, tiny_model_dir):
    cost = measure_cost(tiny_model, folder=tiny_model_dir, **FAST)
    assert cost.disk_bytes == (tiny_model_dir / "model.safetensors").stat().st_size
    assert InferenceCost.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_model_prints_json(capsys, tiny_model_dir):
    code, out, err = run(capsys, "bench-model", "--model", tiny_model_dir, "--device", "cpu", "--json",
                         "--new-tokens", 4, "--repeats", 1)
    assert code == 0, err
    result = json.loads(out)
    name = str(tiny_model_dir)
    assert result["reference"] == name
    cost = InferenceCost.from_dict(result["models"][name])
    assert cost.parameters == make_tiny_model().num_parameters()
    assert list(cost.prefill_tokens_per_s) == ["1x512", "8x128"]
    assert cost.disk_bytes == (tiny_model_dir / "model.safetensors").stat().st_size
    assert result["speedups"][name]["decode"] == 1.0
    assert err.count(f"bench   1/1 {name}") == 1


def test_bench_model_prints_a_table_of_several_models(capsys, tmp_path, tiny_model_dir, tiny_tokenizer):
    make_tiny_model(num_hidden_layers=2).save_pretrained(tmp_path / "half")
    tiny_tokenizer.save_pretrained(tmp_path / "half")
    code, out, err = run(capsys, "bench-model", "--model", tiny_model_dir, "--model", tmp_path / "half",
                         "--new-tokens", 3, "--repeats", 1)
    assert code == 0, err
    header, dense, half, footer = out.splitlines()
    assert header.split()[:4] == ["model", "params", "disk", "MB"]
    assert "prefill 1x512" in header and "prefill 8x128" in header
    assert dense.startswith(str(tiny_model_dir)) and dense.endswith("1.00")
    assert half.startswith(str(tmp_path / "half")) and half.split()[1] == "0.10M"
    assert "decode x relative to" in footer


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "{missing}"], "model folder not found"),
    (["--model", "{tiny}", "--model", "{missing}"], "model folder not found"),  # before the first model loads
    (["--model", "{tiny}", "--model", "{tiny}"], "is given more than once"),
    (["--model", "{tiny}", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--model", "{tiny}", "--dtype", "int3"], "unknown dtype"),
])
def test_bench_model_refuses_bad_input_before_loading(capsys, monkeypatch, tmp_path, tiny_model_dir, argv, message):
    monkeypatch.setattr(inference_cost, "load_measured", lambda *a, **kw: pytest.fail("a model was loaded"))
    argv = [a.format(missing=tmp_path / "missing", tiny=tiny_model_dir) for a in argv]
    code, out, err = run(capsys, "bench-model", *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and out == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["--new-tokens", "0"], "--new-tokens must be positive"),
    (["--repeats", "-1"], "--repeats must be positive"),
    ([], "--model"),
])
def test_bench_model_bad_numbers_exit_2_with_one_line(capsys, tiny_model_dir, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench-model", *(["--model", str(tiny_model_dir)] if argv else []), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err
    assert err.count("\n") == 1


SHAPES = {k: v for k, v in FAST.items() if k not in ("repeats", "warmup")}


def test_a_model_measured_against_a_copy_of_itself_has_an_interval_holding_1(tiny_model):
    # 15 rounds: with noise alike for both, all 15 ratios fall on one side of 1 once in 16,000 runs
    costs, rounds = measure_interleaved({"model": tiny_model, "copy": copy.deepcopy(tiny_model)}, repeats=15, **SHAPES)
    spread = ratio_spread(rounds, "model")
    for key, ratio in spread["copy"].items():
        assert ratio["low"] <= 1.0 <= ratio["high"] or ratio["low"] == ratio["high"] == 1.0, key
    assert spread["model"]["decode"] == {"median": 1.0, "low": 1.0, "high": 1.0, "noisy": False}
    low, high = costs["copy"].decode_range
    assert low <= costs["copy"].decode_tokens_per_s <= high
    assert InferenceCost.from_dict(costs["copy"].to_dict()) == costs["copy"]  # ranges survive the JSON round trip


def test_rounds_take_every_model_once_each_in_turn(tiny_model):
    other = make_tiny_model(num_hidden_layers=2)
    order = []
    for label, model in (("a", tiny_model), ("b", other)):
        model.register_forward_pre_hook(lambda m, a, kw, label=label: order.append(label) if kw["input_ids"].shape[1]
                                        > 1 else None, with_kwargs=True)
    _, rounds = measure_interleaved({"a": tiny_model, "b": other}, repeats=3, warmup=0, **SHAPES)
    assert len(rounds) == 3 and all(set(r) == {"a", "b"} for r in rounds)
    # per model and round: one prefill (1 shape) and one prompt pass; who goes first turns with the rounds
    assert order == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]


def test_a_ratio_whose_range_is_wide_is_marked_noise():
    def cost(decode):
        return InferenceCost("cpu", "float32", 1, 10, 40, None, {"1x8": 100.0}, decode, 40)

    rounds = [{"ref": cost(10.0), "m": cost(20.0)}, {"ref": cost(10.0), "m": cost(30.0)},
              {"ref": cost(10.0), "m": cost(21.0)}]
    spread = ratio_spread(rounds, "ref")
    assert spread["m"]["decode"] == {"median": 2.1, "low": 2.0, "high": 3.0, "noisy": True}
    assert spread["m"]["prefill_1x8"]["noisy"] is False
    assert ratio_text(2.1, spread["m"]["decode"]) == "2.10 (2.00-3.00) noisy"
    assert ratio_text(1.0, {"median": 1.0, "low": 1.0, "high": 1.0, "noisy": False}) == "1.00"


def test_models_too_big_to_hold_at_once_are_measured_one_after_another(monkeypatch):
    from adapruner.search import cost

    monkeypatch.setattr(cost, "available_memory", lambda device: 10)  # no room for two copies
    assert not cost.fits_at_once(make_tiny_model(), 2)
    monkeypatch.setattr(cost, "available_memory", lambda device: None)  # unknown: try
    assert cost.fits_at_once(make_tiny_model(), 2)


def test_a_warm_up_decodes_a_few_tokens_and_the_timed_runs_all_of_them(tiny_model, monkeypatch):
    decoded = []
    real = inference_cost._decode_seconds
    monkeypatch.setattr(inference_cost, "_decode_seconds", lambda m, p, n: decoded.append(n) or real(m, p, n))
    measure_cost(tiny_model, prefill_shapes=((1, 8),), new_tokens=40, prompt_tokens=4, repeats=2, warmup=1)
    assert decoded == [inference_cost.WARMUP_DECODE_TOKENS, 40, 40] and inference_cost.WARMUP_DECODE_TOKENS < 40
