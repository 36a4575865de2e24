"""The command line on the tiny model and local text: output, saved models, one-line errors."""

import json

import pytest
import torch

from adapruner.errors import AdaPrunerError
from adapruner.export import load_pruned
from service.cli import build_parser, main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval(capsys, tiny_model_dir, corpus):
    code, out, _ = run(capsys, "eval", "--model", tiny_model_dir, "--data", corpus, "--seq-len", 32,
                       "--max-windows", 4, "--split", "validation")
    assert code == 0
    assert "4 windows x 32 tokens" in out
    assert float(out.split("ppl")[-1].split()[0]) > 1


@pytest.mark.parametrize("metric", ["wanda_sp", "taylor_first", "taylor_second=0.5,flap_fluctuation=0.5"])
def test_prune_saves_a_loadable_model(capsys, tmp_path, tiny_model_dir, corpus, metric):
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "--model", tiny_model_dir, "--calib", f"{corpus}:4", "--ratio", 0.2,
                         "--metric", metric, "--allocation", "uniform", "--seq-len", 32, "--max-windows", 2,
                         "--out", out_dir)
    assert code == 0, err
    assert "removed" in out
    assert "validation ppl" in out
    assert "test       ppl" in out
    assert f'load    AutoModelForCausalLM.from_pretrained("{out_dir}"' in out  # how to use what was saved
    model, _ = load_pruned(out_dir)
    assert model.config.adapruner["config"]["mixture"]["weights"]
    assert 0.19 < model.config.adapruner["removed_share"] < 0.21
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == 320


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "--ratio", "-0.2"], "--target must be in (0, 1)"),
    (["prune", "--target", "abc"], "--target takes a fraction"),
    (["search", "--target", "1.5"], "--target must be in (0, 1) or a parameter count >= 1"),
    (["search", "--target", "0"], "--target must be in (0, 1) or a parameter count >= 1"),
    (["search", "--target", "0.2,0.2"], "--target lists a target twice"),
    (["search", "--target", "0.2,0.2000001"], "name one study, r0.2"),
    (["search", "--target", "0.2,1.5"], "--target must be in (0, 1) or a parameter count >= 1"),
    (["prune", "--layers", "x"], "--layers takes FIRST:LAST"),
    (["prune", "--repair", "refit"], "invalid choice: 'refit'"),
    (["prune", "--ridge", "0"], "--ridge"),
    (["search", "--min-speedup", "fast"], "--min-speedup must be a number"),
    (["search", "--min-speedup", "-1"], "--min-speedup must be positive"),
    (["eval", "--split", "train"], "invalid choice: 'train'"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err
    assert err.count("\n") == 1


def test_eval_scores_the_builtin_tasks_and_writes_json(capsys, tmp_path, tiny_model_dir):
    code, out, err = run(capsys, "eval", "--model", tiny_model_dir, "--tasks", "books-cloze,books-lastword",
                         "--limit", 3, "--json", tmp_path / "tasks.json")
    assert code == 0, err
    assert "books-cloze          acc" in out
    assert "ppl " not in out  # --tasks without --data: no perplexity
    written = json.loads((tmp_path / "tasks.json").read_text())
    assert [t["samples"] for t in written["tasks"]] == [3, 3]


def test_eval_lists_the_tasks(capsys):
    code, out, _ = run(capsys, "eval", "--list-tasks")
    assert code == 0
    assert "books-cloze, books-lastword" in out


@pytest.fixture
def loading_forbidden(monkeypatch):
    """Any model load fails the test: the argument should have been refused before it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before a bad argument was refused")

    import adapruner.models
    import adapruner.search.study
    import adapruner.session

    monkeypatch.setattr(adapruner.models, "load_model", forbidden)
    monkeypatch.setattr(adapruner.session, "load_model", forbidden)
    monkeypatch.setattr(adapruner.search.study, "open_session", forbidden)


def write_gguf(path, architecture: str) -> None:
    """A small GGUF file whose architecture key comes after an array, a string and a number, as a header may."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.kv_data[0].pop("general.architecture")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
    writer.add_string("general.name", "tiny")
    writer.add_uint32(f"{architecture}.block_count", 2)
    writer.add_architecture()
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_architecture_is_read_from_the_header_alone(tmp_path):
    from adapruner.from_gguf import gguf_architecture

    write_gguf(tmp_path / "m.gguf", "gemma3")
    assert gguf_architecture(tmp_path / "m.gguf") == "gemma3"
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:40])
    with pytest.raises(AdaPrunerError, match="ends inside its GGUF header"):
        gguf_architecture(tmp_path / "cut.gguf")


@pytest.fixture
def broken_models(tmp_path):
    (tmp_path / "not-json").mkdir()
    (tmp_path / "not-json" / "config.json").write_text("{not json")
    (tmp_path / "fake.gguf").write_bytes(b"this is no gguf file")
    write_gguf(tmp_path / "gemma3.gguf", "gemma3")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    return tmp_path


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--dtype", "nonsense"], "unknown dtype 'nonsense'"),
    (["search", "--dtype", "nonsense", "--trials", "2"], "unknown dtype 'nonsense'"),
    (["prune", "--device", "gpu"], "unknown device 'gpu'"),
    (["prune", "--model", "{tiny}", "--layers", "0:99"], "does not fit the model's 4 layers"),
    (["prune", "--model", "{tiny}", "--layers", "3:-2"], "does not fit the model's 4 layers"),
    (["eval", "--model", "{broken}/not-json"], "is not valid JSON"),
    (["search", "--model", "{broken}/not-json"], "is not valid JSON"),
    (["eval", "--model", "{broken}/fake.gguf"], "is not a GGUF file"),
    (["prune", "--model", "{broken}/gemma3.gguf"], "unsupported architecture 'gemma3' (the GGUF header's)"),
    (["prune", "--model", "{broken}/bert"], "unsupported architecture 'bert'"),
    (["eval", "--model", "{tiny}", "--tasks", "books-cloze,no-such-task"], "`adapruner eval --list-tasks` lists"),
])
def test_bad_arguments_are_refused_before_the_model_loads(capsys, loading_forbidden, broken_models,
                                                           tiny_model_dir, argv, message):
    argv = [a.format(tiny=tiny_model_dir, broken=broken_models) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert message in err, err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--seq-len", "0"], "--seq-len must be positive"),
    (["eval", "--tasks", ","], "--tasks takes comma-separated task names"),
    (["eval", "--limit", "0"], "--limit must be positive"),
    (["eval", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
    (["prune", "--layers", "20:4"], "0 <= FIRST < LAST"),
    (["eval", "--max-windows", "-1"], "--max-windows must be >= 0"),
    (["eval", "--batch-size", "0"], "--batch-size must be positive"),
    (["finetune", "--seq-len", "-5"], "--seq-len must be positive"),
])
def test_bad_numbers_exit_2_before_the_model_loads(capsys, loading_forbidden, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err
    assert err.count("\n") == 1


def test_user_errors_exit_2_with_one_line(capsys, tmp_path, tiny_model_dir, corpus):
    code, _, err = run(capsys, "eval", "--model", tmp_path / "missing")
    assert code == 2
    assert err.startswith("adapruner: error: model folder not found")
    assert err.count("\n") == 1
    code, _, err = run(capsys, "prune", "--model", tiny_model_dir, "--calib", f"{corpus}:4", "--metric", "l0",
                       "--seq-len", 32, "--allocation", "uniform")
    assert code == 2
    assert "unknown importance metric 'l0'" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--data", "builtin:poems")
    assert code == 2
    assert "built-in text source 'poems'" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, "search", "--model", tiny_model_dir, "--calib", f"{corpus}:4", "--min-speedup", 1)
    assert code == 2
    assert "min_speedup must be a number above 1" in err
    assert err.count("\n") == 1


def test_search_takes_a_parameter_count_as_its_ratio():
    assert build_parser().parse_args(["search", "--ratio", "28021248"]).target == (28021248,)


def test_search_takes_a_fraction_as_its_ratio():
    assert build_parser().parse_args(["search", "--target", "0.3"]).target == (0.3,)


def test_search_takes_several_targets():
    assert build_parser().parse_args(["search", "--target", "0.1, 0.2,0.3"]).target == (0.1, 0.2, 0.3)


def test_serve_opens_the_api_only_the_dashboard_stays_on_localhost():
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    assert args.host == "0.0.0.0"
    assert args.dashboard_host == "127.0.0.1"  # the dashboard has no auth


def test_a_heldout_source_that_also_calibrates_exits_2_before_anything_is_stored(capsys, tmp_path, corpus,
                                                                                tiny_model_dir, loading_forbidden):
    code, _, err = run(capsys, "search", "--model", tiny_model_dir, "--calib", corpus,
                       "--heldout", corpus, "--storage", f"sqlite:///{tmp_path / 'runs.db'}")
    assert code == 2
    assert "held-out source" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs.db").exists()


@pytest.mark.parametrize(("argv", "heldout"), [([], None), (["--heldout", "none"], ()),
                                                 (["--heldout", "a.txt", "--heldout", "b.txt"], ("a.txt", "b.txt"))])
def test_heldout_flag(argv, heldout):
    from adapruner.cli.args import parse_heldout

    assert parse_heldout(build_parser().parse_args(["search", *argv]).heldout) == heldout


def test_an_unknown_repair_mode_exits_2_before_the_model_loads(capsys, tmp_path, corpus, tiny_model_dir,
                                                              loading_forbidden):
    code, _, err = run(capsys, "search", "--model", tiny_model_dir, "--calib", corpus,
                       "--repairs", "off,refit", "--storage", f"sqlite:///{tmp_path / 'runs.db'}")
    assert code == 2
    assert "unknown repair mode 'refit'" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs.db").exists()


def test_prune_repairs_and_saves_the_refitted_model(capsys, tmp_path, tiny_model_dir, corpus):
    code, out, _ = run(capsys, "prune", "--model", tiny_model_dir, "--calib", f"{corpus}:4", "--metric", "wanda_sp",
                       "--seq-len", 32, "--layers", "0:0", "--repair", "pool", "--ridge", "0.001",
                       "--out", tmp_path / "pruned")
    assert code == 0, out
    model, _ = load_pruned(tmp_path / "pruned")
    assert model.config.adapruner["config"]["repair"] == {"mode": "pool", "ridge": 0.001}


@pytest.mark.parametrize(("argv", "steps", "lr"), [
    (["search", "--lora-steps", "7", "--lora-lr", "0.01"], 7, 0.01),
    (["search", "--recover-steps", "7", "--recover-lr", "0.01"], 7, 0.01),
    (["prune", "--lora-steps", "3", "--lora-lr", "0.02"], 3, 0.02),
    (["prune", "--finetune-steps", "3", "--lr", "0.02"], 3, 0.02),
    (["finetune", "--lora-steps", "5"], 5, None),
    (["finetune", "--steps", "5"], 5, None),
])
def test_lora_flags_have_one_name_in_every_command_and_keep_their_old_names(argv, steps, lr):
    args = build_parser().parse_args(argv)
    assert args.lora_steps == steps
    if lr is not None:
        assert args.lr == lr


def test_devices_all_is_one_worker_per_visible_gpu():
    from service.cli import worker_devices

    assert worker_devices("all", 3) == ["cuda:0", "cuda:1", "cuda:2"]


def test_devices_takes_gpu_indices():
    from service.cli import worker_devices

    assert worker_devices("0,2", 3) == ["cuda:0", "cuda:2"]


@pytest.mark.parametrize(("argv", "message"), [
    (["worker", "--devices", "all"], "no GPU is visible"),
    (["worker", "--devices", "1,x"], "--devices takes all or GPU indices"),
    (["worker", "--devices", "0", "--device", "cpu"], "give --device or --devices, not both"),
])
def test_bad_worker_devices_exit_2_with_one_line(capsys, argv, message, monkeypatch):
    import torch

    from service.cli import main as service_main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code = service_main(argv)
    err = capsys.readouterr().err
    assert (code, message in err, err.count("\n")) == (2, True, 1)


def _search_options() -> dict[str, object]:
    """The search command's flags and the argparse actions behind them."""
    search = next(a for a in build_parser()._subparsers._group_actions).choices["search"]
    return {flag: action for action in search._actions for flag in action.option_strings}


def _http_fields(model, prefix: str = "") -> list[str]:
    """Every field of a pydantic request body, ``space.*``/``finetune.*`` for the nested ones."""
    from pydantic import BaseModel

    fields = []
    for name, info in model.model_fields.items():
        nested = [t for t in getattr(info.annotation, "__args__", (info.annotation,))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        fields += _http_fields(nested[0], f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return fields


def test_the_search_flags_and_the_http_spec_take_the_same_fields_with_the_same_defaults():
    from adapruner.cli.search import SEARCH_FLAGS, search_job
    from service.schemas import JobCreate

    options = _search_options()
    service_only = {"name", "trust_remote_code"}  # the job's label and the operator's permission: HTTP only
    missing = [field for field in _http_fields(JobCreate) if field not in service_only
               and SEARCH_FLAGS.get(field, "--" + field.split(".")[-1].replace("_", "-")) not in options]
    assert missing == []
    args = build_parser().parse_args(["search"])
    assert search_job(args).to_dict() == JobCreate().to_search_job().to_dict()
    # and a value given to a flag reaches the field the HTTP API names alike
    args = build_parser().parse_args(["search", "--aggregations", "sum", "--ridge", "0.01:1", "--no-attn-share",
                                      "--lora-steps", "3", "--lora-alpha", "8", "--train-batch-size", "2"])
    http = JobCreate(space={"aggregations": ["sum"], "ridge": [0.01, 1], "attn_share": False},
                     finetune={"steps": 3, "alpha": 8, "batch_size": 2})
    assert search_job(args).to_dict() == http.to_search_job().to_dict()


@pytest.mark.parametrize("ridge", ["1:0.1", "0:1", "a:b"])
def test_a_bad_ridge_range_is_one_line_and_exit_2(capsys, ridge):
    with pytest.raises(SystemExit) as exited:
        main(["search", "--ridge", ridge])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ridge takes MIN:MAX" in err
