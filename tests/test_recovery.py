"""Recovery (LoRA merged into pruned weights) and Adapt-Pruner's incremental schedule, on the tiny model."""

import pytest
import torch
from helpers import make_documents, make_tiny_model
from test_structure_prune import random_plan

from adapruner.data import build_pool, split_documents, tokenize_windows
from adapruner.errors import AdaPrunerError
from adapruner.evaluate import perplexity
from adapruner.export import load_pruned, save_pruned
from adapruner.finetune import LoRA, finetune
from adapruner.importance import Mixture
from adapruner.incremental import prune_incrementally, schedule
from adapruner.plan import Allocation
from adapruner.prune import prune_model
from adapruner.search import SearchJob, SearchSpace, run_search
from adapruner.session import PruningSession
from adapruner.structure import model_structure
from service.cli import main


@pytest.fixture(scope="module")
def text_windows(tiny_tokenizer):
    docs = make_documents(40, words_per_doc=200)
    return tokenize_windows(tiny_tokenizer, docs[:30], 32), tokenize_windows(tiny_tokenizer, docs[30:], 32)


def test_lora_lowers_loss_and_merges_into_the_pruned_weights(text_windows, tmp_path, tiny_tokenizer):
    train, held_out = text_windows
    model = make_tiny_model()
    pruned = prune_model(model, random_plan(model, seed=3, keep_fraction=0.75))
    shapes = {n: p.shape for n, p in pruned.named_parameters()}
    before = perplexity(pruned, held_out, progress=False).ppl
    result = finetune(pruned, train, LoRA(steps=40, r=4, alpha=8, lr=1e-2, batch_size=4, dropout=0.0),
                      progress=False)
    after = perplexity(result.model, held_out, progress=False).ppl
    assert after < 0.9 * before, (before, after)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert {n: p.shape for n, p in result.model.named_parameters()} == shapes  # merged: no adapters left
    assert not any("lora" in n for n in result.model.state_dict())
    save_pruned(result.model, tiny_tokenizer, tmp_path)
    loaded, _ = load_pruned(tmp_path)
    ids = held_out[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_gradient_checkpointing_gives_the_same_training(text_windows):
    train, _ = text_windows
    lora = LoRA(steps=3, r=2, alpha=4, lr=1e-3, batch_size=2, dropout=0.0)
    plain = finetune(make_tiny_model(), train, lora, progress=False)
    checkpointed = finetune(make_tiny_model(), train, LoRA(**{**lora.__dict__, "gradient_checkpointing": True}),
                            progress=False)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-4)


def test_zero_steps_and_bad_budgets(text_windows):
    model = make_tiny_model()
    assert finetune(model, text_windows[0], LoRA(steps=0)).model is model
    with pytest.raises(AdaPrunerError):
        LoRA(r=0)
    with pytest.raises(AdaPrunerError, match="dropout"):
        LoRA(dropout=1.0)


def test_schedule():
    assert schedule(0.2, 0.05) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert schedule(0.2, 0.15) == pytest.approx([0.15, 0.2])
    with pytest.raises(AdaPrunerError):
        schedule(0.2, 0.3)
    with pytest.raises(AdaPrunerError):
        schedule(1.2, 0.05)


@pytest.mark.parametrize("mixture", [Mixture.single("taylor_second"), Mixture.single("taylor_first")])
def test_incremental_reaches_the_exact_target(text_windows, mixture):
    train, _ = text_windows
    model = make_tiny_model(num_hidden_layers=6, intermediate_size=160)
    original = model_structure(model)
    lora = LoRA(steps=3, r=2, alpha=4, lr=1e-3, batch_size=2)
    result = prune_incrementally(model, train[:6], mixture, 0.2, step=0.05, allocation=Allocation(strength=0.5),
                                 lora=lora, train_windows=train, progress=False)
    assert len(result.steps) == 4
    kept = model_structure(result.model).total_params
    assert abs((original.total_params - kept) - round(0.2 * original.total_params)) <= \
        original.layers[0].channel_params
    assert [s.params for s in result.steps] == sorted((s.params for s in result.steps), reverse=True)
    assert all(s.finetune_loss is not None for s in result.steps[:-1])
    assert result.steps[-1].finetune_loss is None
    assert model_structure(model).total_params == original.total_params  # the input is untouched
    out = result.model(input_ids=train[:1]).logits
    assert torch.isfinite(out).all()


def test_search_job_recovers_the_best_configuration(tiny_tokenizer, tmp_path):
    source = split_documents("toy", make_documents(60, 150))
    pool = build_pool(tiny_tokenizer, [(source, 12)], seq_len=32)
    session = PruningSession(make_tiny_model(), tiny_tokenizer, pool, [source], [source],
                             max_eval_windows={"validation": 8, "test": 6}, progress=False, cache_statistics=False)
    job = SearchJob(model="tiny", calibration=("toy",), trials=4, pool_size=12, seq_len=32, val_windows=8,
                    test_windows=6, baselines=("wanda-sp",), space=SearchSpace(subset_size=(2, 6), n_clusters=2),
                    finetune=LoRA(steps=15, r=4, alpha=8, lr=5e-3, dropout=0.0))
    assert SearchJob.from_dict(job.to_dict()) == job
    result = run_search(job, None, "rec", session=session, out_dir=tmp_path / "out", artifact_dir=tmp_path / "a",
                        progress=False)
    recovery = result.study.user_attrs["finetune"]
    assert recovery["steps"] == 15
    assert recovery["test_ppl_after"] < recovery["test_ppl_before"]
    assert recovery["test_ppl_before"] == pytest.approx(result.best_trial.user_attrs["test_ppl"])
    model, _ = load_pruned(result.model_dir)
    assert model.config.adapruner["finetune"]["test_ppl_after"] == recovery["test_ppl_after"]


def test_cli_finetune_and_incremental_prune(capsys, tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(40, words_per_doc=200)):
        (corpus / f"d{i}.txt").write_text(doc)
    pruned_dir = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--calib", f"{corpus}:4", "--ratio", "0.2",
                 "--metric", "taylor_second", "--allocation", "adaptive", "--incremental", "--step", "0.1",
                 "--finetune-steps", "2", "--seq-len", "32", "--max-windows", "2", "--out", str(pruned_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("step    ->") == 2
    assert "LoRA loss" in out
    assert "(removed" in out
    assert main(["finetune", "--model", str(pruned_dir), "--data", str(corpus), "--steps", "5", "--lr", "0.005",
                 "--seq-len", "32", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "before  test ppl" in out
    assert "after   test ppl" in out
    model, _ = load_pruned(str(pruned_dir) + "-lora")
    assert model.config.adapruner["finetune"]["lora"]["steps"] == 5
