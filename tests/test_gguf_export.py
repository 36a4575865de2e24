"""GGUF export run in llama.cpp: tiny models with per-layer sizes, a dropped layer and a repair's biases give
llama.cpp the logits PyTorch gives; uniform models stay their own architecture; bad input is refused early."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import make_tiny_model

from adapruner.errors import AdaPrunerError
from adapruner.export import save_pruned
from adapruner.importance import GroupScores
from adapruner.plan import Allocation, make_plan
from adapruner.prune import prune_model
from adapruner.repair import Repair, collect_moments, repair_pruned
from adapruner.structure import model_structure
from adapruner.to_gguf import permute_rotary, pre_tokenizer, read_layout, write_gguf
from service.cli import main


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is required in CI (make install puts it in the virtualenv)")
        pytest.skip("llama-cpp-python is not installed (and CI is unset): make install builds it")
    return llama_cpp


# Both sides compute in float32 from the same f32 weights (llama.cpp's KV cache set to f32 as well); what is
# left is summation order and llama.cpp's own rotary and softmax kernels. Measured on these models (5 prompts of
# 40 tokens): at most 4.0e-7 (Llama) and 4.4e-7 (Qwen2) of the logits' spread; 1e-3 of it leaves room for other
# CPUs' kernels and still fails on any layout error (a wrong permutation, size or bias moves logits by their
# whole spread).
TOLERANCE = 1e-3


def scores(structure, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GroupScores([torch.rand(s.n_groups, generator=g) for s in structure.layers],
                       [torch.rand(s.n_channels, generator=g) for s in structure.layers])


def prompts(n=3, length=12, vocab=320):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def torch_greedy(model, ids, n):
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def f32_llama(path):
    llama_cpp = llama_cpp_or_skip()
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                           n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def pruned_folder(tmp_path, tokenizer, model_type="llama", drop=1, repair=True, seed=3):
    model = make_tiny_model(model_type, num_hidden_layers=6, intermediate_size=160, seed=seed)
    structure = model_structure(model)
    cos = torch.tensor([0.2, 0.9, 0.5, 0.95, 0.4, 0.6])
    plan = make_plan(structure, scores(structure, seed), 0.3, Allocation(drop_layers=drop), cos)
    pruned = prune_model(model, plan)
    if repair:
        windows = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(1))
        repair_pruned(pruned, model, plan, collect_moments(model, windows, progress=False), Repair("pool"))
    return pruned, save_pruned(pruned, tokenizer, tmp_path / f"{model_type}-pruned")


def assert_same_logits(model, gguf_path):
    from adapruner.llama_runtime import greedy, sequence_logits

    llm = f32_llama(gguf_path)
    for ids in prompts():
        ours, theirs = torch_logits(model, ids), sequence_logits(llm, ids)
        assert theirs.shape == ours.shape
        spread = ours.max() - ours.min()
        assert np.abs(theirs - ours).max() <= TOLERANCE * spread
        assert greedy(llm, ids, 6) == torch_greedy(model, ids, 6)
    llm.close()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_per_layer_sizes_a_dropped_layer_and_repair_biases_run_in_llama_cpp_as_deci(model_type, tmp_path,
                                                                                    tiny_tokenizer):
    pruned, folder = pruned_folder(tmp_path, tiny_tokenizer, model_type)
    layout = read_layout(folder)
    assert layout.arch == "deci" and len(layout.ff) == 5 and len(set(layout.ff)) > 1 and len(set(layout.kv_heads)) > 1
    assert layout.output_bias
    assert_same_logits(pruned, write_gguf(folder, tmp_path / "m.gguf", "f32", progress=False))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_uniform_model_is_written_as_its_own_architecture(model_type, tmp_path, tiny_tokenizer):
    model = make_tiny_model(model_type, seed=4)
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "dense")
    assert read_layout(folder).arch == model_type
    path = write_gguf(folder, tmp_path / "dense.gguf", "f32", progress=False)
    assert_same_logits(model, path)
    from gguf import GGUFReader

    assert GGUFReader(path).fields["general.architecture"].contents() == model_type


def test_f16_bf16_and_llama_cpp_quantized_files_load_and_shrink(tmp_path, tiny_tokenizer):
    from adapruner.llama_runtime import load_gguf, sequence_logits

    pruned, folder = pruned_folder(tmp_path, tiny_tokenizer, repair=False)
    sizes, argmax_agreement = {}, {}
    ids = prompts(1, 32)[0]
    reference = torch_logits(pruned, ids).argmax(-1)
    for quant in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
        path = write_gguf(folder, tmp_path / f"m-{quant}.gguf", quant, progress=False)
        sizes[quant] = path.stat().st_size
        llm = load_gguf(path, n_ctx=64, threads=2)
        argmax_agreement[quant] = float((sequence_logits(llm, ids).argmax(-1) == reference).mean())
        llm.close()
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q4_k_m"]
    assert argmax_agreement["f32"] == argmax_agreement["f16"] == 1.0
    assert argmax_agreement["q8_0"] >= 0.9
    assert not list(tmp_path.glob("*.part"))  # the quantizer's f16 input is gone


def test_rotary_permutation_pairs_each_heads_halves():
    t = torch.arange(8).float()  # one head of 8 rows: halves (0 1 2 3) (4 5 6 7)
    assert permute_rotary(t, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = torch.arange(16).float().reshape(16, 1).repeat(1, 3)
    assert permute_rotary(two, 2)[8:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                                               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}},
        {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
])
def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it(pre, name, tmp_path):
    assert pre_tokenizer({"pre_tokenizer": pre}, tmp_path) == name


def test_an_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    with pytest.raises(AdaPrunerError, match="Whitespace"):
        pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}, tmp_path)


def test_the_gguf_source_tokenizer_settings_travel_with_the_export(tmp_path, tiny_tokenizer):
    from gguf import GGUFReader

    source = tmp_path / "source"
    tiny_tokenizer.save_pretrained(source)
    (source / "gguf_tokenizer.json").write_text(json.dumps({"tokenizer.ggml.pre": "smollm",
                                                            "tokenizer.ggml.add_bos_token": False}))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = save_pruned(make_tiny_model(seed=2), tokenizer, tmp_path / "export")
    assert json.loads((folder / "gguf_tokenizer.json").read_text())["tokenizer.ggml.pre"] == "smollm"
    fields = GGUFReader(write_gguf(folder, tmp_path / "m.gguf", "f32", progress=False)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 320


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_export_cli_writes_a_file_llama_cpp_loads(tmp_path, tiny_tokenizer, capsys):
    pruned, folder = pruned_folder(tmp_path, tiny_tokenizer)
    code = main(["export", str(folder), "--out", str(tmp_path / "cli.gguf"), "--quant", "f32"])
    assert code == 0 and "deci" in capsys.readouterr().out
    assert_same_logits(pruned, tmp_path / "cli.gguf")


def test_export_refuses_a_folder_that_is_no_model(tmp_path, capsys):
    code, err = run_cli(["export", str(tmp_path), "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and len(err) == 1 and "no config.json" in err[0]
    assert not (tmp_path / "x.gguf").exists()


def test_export_refuses_an_architecture_llama_cpp_cannot_take_here(tmp_path, tiny_tokenizer, capsys):
    folder = save_pruned(make_tiny_model(seed=1), tiny_tokenizer, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    code, err = run_cli(["export", str(folder), "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and len(err) == 1 and "'qwen3'" in err[0]


def test_export_refuses_an_unknown_quant_type_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "--out", str(tmp_path / "x.gguf"), "--quant", "q3_xs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "q3_xs" in err[0]


def test_export_without_a_tokenizer_is_refused_before_writing(tmp_path, capsys):
    folder = save_pruned(make_tiny_model(seed=1), None, tmp_path / "m")
    code, err = run_cli(["export", str(folder), "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and "tokenizer.json" in err[0]
    shutil.rmtree(folder)


def test_prune_writes_a_gguf_beside_its_folder_when_asked(capsys, tmp_path, tiny_model_dir, corpus):
    from adapruner.export import load_pruned

    out_dir = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--calib", f"{corpus}:4", "--ratio", "0.2",
                 "--metric", "wanda_sp", "--allocation", "adaptive", "--seq-len", "32", "--max-windows", "2",
                 "--out", str(out_dir), "--export-format", "gguf", "--gguf-type", "f32"])
    out = capsys.readouterr().out
    assert code == 0 and f"gguf    {out_dir / 'model.gguf'}" in out
    assert_same_logits(load_pruned(out_dir)[0], out_dir / "model.gguf")


def test_prune_refuses_a_gguf_export_without_a_folder_before_loading(capsys, tiny_model_dir):
    code, err = run_cli(["prune", "--model", str(tiny_model_dir), "--allocation", "uniform", "--export-format", "gguf"],
                        capsys)
    assert code == 2 and len(err) == 1 and "--out" in err[0]


def test_the_same_gguf_measured_twice_interleaved_is_as_fast_as_itself(tmp_path, tiny_tokenizer):
    """Speeds in llama.cpp: two labels for one file, 12 interleaved rounds; the range of their ratio holds 1."""
    from adapruner.inference_cost import ratio_spread
    from adapruner.llama_runtime import measure_gguf_interleaved

    _, folder = pruned_folder(tmp_path, tiny_tokenizer, repair=False)
    path = write_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    costs, rounds = measure_gguf_interleaved({"a": path, "b": path}, repeats=12, prompt_tokens=32, new_tokens=16,
                                             threads=1)
    assert len(rounds) == 12 and [list(r) for r in rounds[:2]] == [["a", "b"], ["b", "a"]]
    spread = ratio_spread(rounds, "a")["b"]
    for key in ("decode", "prefill_1x32"):
        assert spread[key]["low"] <= 1 <= spread[key]["high"], spread[key]
    assert costs["a"].decode_tokens_per_s > 0 and costs["a"].disk_bytes == path.stat().st_size
    assert costs["a"].dtype == "f16" and costs["a"].parameters == sum(
        p.numel() for p in pruned_folder(tmp_path / "again", tiny_tokenizer, repair=False)[0].parameters())


def test_bench_model_measures_gguf_files_in_llama_cpp(tmp_path, tiny_tokenizer, capsys):
    _, folder = pruned_folder(tmp_path, tiny_tokenizer, repair=False)
    dense = write_gguf(save_pruned(make_tiny_model(seed=3, num_hidden_layers=6, intermediate_size=160),
                                   tiny_tokenizer, tmp_path / "dense"), tmp_path / "dense.gguf", "f16", progress=False)
    pruned = write_gguf(folder, tmp_path / "pruned.gguf", "q8_0", progress=False)
    code = main(["bench-model", "--runtime", "llama.cpp", "--model", str(dense), "--model", str(pruned),
                 "--repeats", "2", "--new-tokens", "8", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "llama.cpp" in out and str(pruned) in out and "decode x" in out


def test_bench_model_in_llama_cpp_refuses_a_folder_in_one_line(tmp_path, tiny_model_dir, capsys):
    code, err = run_cli(["bench-model", "--runtime", "llama.cpp", "--model", str(tiny_model_dir)], capsys)
    assert code == 2 and len(err) == 1 and "adapruner export" in err[0]


def test_search_writes_the_best_as_gguf_beside_its_folder(capsys, tmp_path, roots):
    out = tmp_path / "out"
    code = main(["search", "--model", str(roots / "models" / "tiny"), "--calib", str(roots / "texts" / "toy"),
                 "--pool-size", "12", "--seq-len", "32", "--val-windows", "8", "--test-windows", "4",
                 "--subset-size", "2:6", "--clusters", "3", "--trials", "2", "--storage",
                 f"sqlite:///{tmp_path / 'runs.db'}", "--out", str(out), "--artifacts", str(tmp_path / "artifacts"),
                 "--baselines", "magnitude", "--no-measure", "--export-format", "gguf", "--gguf-type", "f32"])
    printed = capsys.readouterr().out
    assert code == 0 and f"gguf    {out / 'model.gguf'}" in printed
    from adapruner.export import load_pruned

    assert_same_logits(load_pruned(out / "model")[0], out / "model.gguf")


def test_search_refuses_a_gguf_export_of_an_architecture_llama_cpp_cannot_take_before_loading(
        capsys, tmp_path, tiny_tokenizer):
    folder = save_pruned(make_tiny_model(seed=1), tiny_tokenizer, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn",
                                                                                  "rope_theta": 1e4}}))
    code, err = run_cli(["search", "--model", str(folder), "--export-format", "gguf"], capsys)
    assert code == 2 and len(err) == 1 and "'yarn'" in err[0]


def test_prune_with_dropped_layers_prints_them_and_exports_them_to_gguf(capsys, tmp_path, tiny_model_dir, corpus):
    from adapruner.export import load_pruned

    out_dir = tmp_path / "deep"
    code = main(["prune", "--model", str(tiny_model_dir), "--calib", f"{corpus}:4", "--ratio", "0.4",
                 "--metric", "wanda_sp", "--allocation", "uniform", "--drop-layers", "1", "--seq-len", "32",
                 "--max-windows", "2", "--out", str(out_dir), "--export-format", "gguf", "--gguf-type", "f32"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("  dropped\n") == 1
    model = load_pruned(out_dir)[0]
    assert model.config.num_hidden_layers == 3
    assert_same_logits(model, out_dir / "model.gguf")


def test_llama_cpps_quantizer_prints_nothing_to_the_console(tmp_path, tiny_tokenizer, capfd):
    _, folder = pruned_folder(tmp_path, tiny_tokenizer, repair=False)
    capfd.readouterr()
    write_gguf(folder, tmp_path / "q.gguf", "q8_0", progress=False)
    out, err = capfd.readouterr()
    assert "converting to" not in out + err and "llama_model_quantize" not in out + err
    assert not list(tmp_path.glob("*.log"))


def test_zero_channels_padding_the_mlp_change_no_logit(tmp_path, tiny_tokenizer):
    pruned, folder = pruned_folder(tmp_path, tiny_tokenizer)
    assert any(f % 32 for f in read_layout(folder).ff)
    path = write_gguf(folder, tmp_path / "padded.gguf", "f32", progress=False, ff_multiple=32)
    from gguf import GGUFReader

    widths = list(GGUFReader(path).fields["deci.feed_forward_length"].contents())
    assert all(w % 32 == 0 for w in widths) and widths != list(read_layout(folder).ff)
    assert_same_logits(pruned, path)


def test_a_quantized_export_quantizes_every_cut_projection(tmp_path, tiny_tokenizer):
    from gguf import GGMLQuantizationType, GGUFReader

    _, folder = pruned_folder(tmp_path, tiny_tokenizer, repair=False)
    path = write_gguf(folder, tmp_path / "q8.gguf", "q8_0", progress=False)
    kinds = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    down = [kind for name, kind in kinds.items() if name.endswith("ffn_down.weight")]
    assert down and all(kind == GGMLQuantizationType.Q8_0 for kind in down), kinds


def test_llama_cpp_extra_buffers_are_off_on_amx_cpus_unless_told(monkeypatch):
    from adapruner import llama_runtime

    monkeypatch.delenv("ADAPRUNER_LLAMA_EXTRA_BUFFERS", raising=False)
    for amx in (True, False):
        monkeypatch.setattr(llama_runtime, "cpu_has_amx", lambda amx=amx: amx)
        assert llama_runtime.extra_buffers_default() is (not amx)
    for value, expected in (("0", False), ("off", False), ("1", True)):
        monkeypatch.setenv("ADAPRUNER_LLAMA_EXTRA_BUFFERS", value)
        assert llama_runtime.extra_buffers_default() is expected
    llama_cpp = pytest.importorskip("llama_cpp")
    with llama_runtime.model_params(llama_cpp, extra_buffers=False):
        assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored
