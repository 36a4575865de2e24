"""Atomic writes into the cache: a reader sees the old file or the whole new one, never a part."""

import pytest
import torch

from adapruner.cache import atomic_folder, atomic_path, load_layer_tensors, save_layer_tensors


def test_a_write_that_fails_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "corpus.json"
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text("half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_write_replaces_the_old_file_only_when_complete(tmp_path):
    target = tmp_path / "corpus.json"
    target.write_text("old")
    with atomic_path(target) as partial:
        partial.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


def test_a_folder_appears_whole_and_two_processes_building_it_at_once_both_succeed(tmp_path):
    target = tmp_path / "models" / "smollm2-135m"
    target.parent.mkdir()
    with atomic_folder(target) as first, atomic_folder(target.with_name("other")) as unrelated:
        (first / "config.json").write_text("first")
        (unrelated / "x").write_text("x")
        assert not target.exists()
        racer = target.with_name(f"{target.name}.racer.part")  # another process's folder, published first
        racer.mkdir()
        (racer / "config.json").write_text("racer")
        racer.rename(target)
    assert (target / "config.json").read_text() == "racer"  # ours discarded, theirs kept whole
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["other", "smollm2-135m"]


def test_a_folder_that_fails_to_fill_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as partial:
        (partial / "half.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_layer_keyed_tensors_round_trip(tmp_path):
    tensors = {(0, "o_proj"): torch.randn(3, 3), (12, "down_proj"): torch.randn(2)}
    save_layer_tensors(tensors, tmp_path / "g.safetensors")
    loaded = load_layer_tensors(tmp_path / "g.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
