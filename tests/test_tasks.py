"""Downstream accuracy through lm-evaluation-harness on the tiny model: the wrapper around the loaded
module (a pruned model with per-layer sizes), the built-in tasks' generation, and the errors."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_model

from adapruner.errors import AdaPrunerError
from adapruner.plan import LayerPlan, PruningPlan
from adapruner.prune import prune_model
from adapruner.structure import model_structure
from adapruner.tasks import (
    check_tasks,
    cloze_items,
    evaluate_tasks,
    headline,
    lastword_items,
    mean_accuracy,
    sha256_of,
)

DOCUMENTS = [
    "\n\n".join(
        " ".join(f"The {w} of the {w} was {v} and {u}." for w, v, u in zip(words, words[1:], words[2:], strict=False))
        for words in (["house", "garden", "river", "letter", "sister", "morning", "evening"][k:] * 2 for k in range(3))
    )
] * 4


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    files = {"tiny-cloze": folder / "cloze.jsonl", "tiny-lastword": folder / "lastword.jsonl"}
    choices = ["a to in", "is was that", "for it with", "as his on"]
    cloze = [{"context": "the of and", "choices": choices, "label": i % 4} for i in range(8)]
    lastword = [{"context": "the of and a to in is was that for", "target": "with"} for _ in range(6)]
    for name, items in (("tiny-cloze", cloze), ("tiny-lastword", lastword)):
        files[name].write_text("".join(json.dumps(item) + "\n" for item in items))
    return files


@pytest.fixture(scope="module")
def non_uniform(tiny_tasks):
    """The tiny model with its first layer cut to one KV group and half its channels, the rest whole."""
    model = make_tiny_model()
    structure = model_structure(model)
    layers = [LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))) for s in structure.layers]
    layers[0] = LayerPlan((0,), tuple(range(0, structure.layers[0].n_channels, 2)))
    return prune_model(model, PruningPlan(tuple(layers), 0, structure.total_params))


@pytest.fixture(scope="module")
def results(non_uniform, tiny_tokenizer, tiny_tasks):
    return evaluate_tasks(non_uniform, tiny_tokenizer, ["tiny-cloze", "tiny-lastword"], local=tiny_tasks,
                          batch_size=4)


def test_a_model_whose_layers_differ_is_evaluated_as_it_is(non_uniform, results):
    assert [r.error for r in results] == [None, None]


def test_every_item_is_scored(results):
    assert [r.samples for r in results] == [8, 6]


def test_accuracy_is_a_share(results):
    assert all(0.0 <= r.metrics["acc"] <= 1.0 for r in results)


def test_the_lastword_task_reports_perplexity(results):
    assert results[1].metrics["perplexity"] > 1


def test_each_result_records_its_datas_hash(results, tiny_tasks):
    assert [r.data_sha256 for r in results] == [sha256_of(tiny_tasks[name]) for name in ("tiny-cloze", "tiny-lastword")]


def test_mean_accuracy_is_the_mean_over_tasks(results):
    cloze, lastword = results
    assert mean_accuracy(results) == pytest.approx((cloze.metrics["acc_mutual_info"] + lastword.metrics["acc"]) / 2)


def test_the_cloze_is_scored_by_mutual_information(results):
    assert headline(results[0]) == "acc_mutual_info"


def test_the_lastword_is_scored_by_accuracy(results):
    assert headline(results[1]) == "acc"


def test_the_score_is_the_models(tiny_tokenizer, tiny_tasks, non_uniform, results):
    """A different model scores the same items differently: the harness ran this module, not another."""
    other = make_tiny_model(seed=7)
    again = evaluate_tasks(other, tiny_tokenizer, ["tiny-lastword"], local=tiny_tasks, batch_size=4)
    assert again[0].metrics["perplexity"] != pytest.approx(results[1].metrics["perplexity"])


def test_the_model_is_left_as_it_was(non_uniform, tiny_tokenizer, tiny_tasks):
    non_uniform.train()
    evaluate_tasks(non_uniform, tiny_tokenizer, ["tiny-lastword"], local=tiny_tasks, limit=2)
    assert non_uniform.training


def test_a_task_whose_data_cannot_be_fetched_fails_alone(non_uniform, tiny_tokenizer, tiny_tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = evaluate_tasks(non_uniform, tiny_tokenizer, ["piqa", "tiny-cloze"], local=tiny_tasks, limit=2)
    assert out[0].error is not None
    assert out[1].metrics["acc"] >= 0


def test_lm_evals_own_task_index_is_read_only_for_a_hub_task(non_uniform, tiny_tokenizer, tiny_tasks, monkeypatch):
    import lm_eval.tasks

    import adapruner.tasks

    built = []
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: built.append(kw) or real(**kw))
    adapruner.tasks.task_manager.cache_clear()
    try:
        local = evaluate_tasks(non_uniform, tiny_tokenizer, ["tiny-lastword"], local=tiny_tasks, limit=2)
        assert built == [{"include_defaults": False}] and local[0].error is None
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        evaluate_tasks(non_uniform, tiny_tokenizer, ["piqa", "tiny-lastword"], local=tiny_tasks, limit=2)
        assert built[1:] == [{"include_defaults": True}]  # a hub task needs lm-eval's own (its data may still fail)
    finally:
        adapruner.tasks.task_manager.cache_clear()


def test_an_unknown_task_is_refused_with_how_to_list_them():
    with pytest.raises(AdaPrunerError, match="--list-tasks"):
        check_tasks(["no-such-task"])


def test_hub_and_builtin_task_names_are_known():
    check_tasks(["books-cloze", "books-lastword", "piqa"])


def test_cloze_items_hold_the_true_next_sentence_at_their_label():
    for item in cloze_items(DOCUMENTS, n=10, seed=1):
        true = item["choices"][item["label"]]
        assert any(item["context"].split(". ")[-1] in p and true in p for p in DOCUMENTS[0].split("\n\n"))


def test_cloze_items_offer_four_distinct_choices():
    assert all(len(set(item["choices"])) == 4 for item in cloze_items(DOCUMENTS, n=10, seed=1))


def test_task_items_are_reproducible():
    assert cloze_items(DOCUMENTS, n=10, seed=3) == cloze_items(DOCUMENTS, n=10, seed=3)


def test_lastword_targets_end_their_passage():
    items = lastword_items(DOCUMENTS, n=5, seed=1)
    assert items
    assert all(f"{item['context']} {item['target']}." in DOCUMENTS[0] for item in items)


def test_an_accuracy_comes_with_its_standard_error():
    from adapruner.search.accuracy import accuracy_table
    from adapruner.tasks import TaskResult, accuracy_stderr, mean_accuracy_stderr, ratio_stderr

    given = TaskResult("a", {"acc": 0.6}, {"acc": 0.03}, samples=100)
    counted = TaskResult("b", {"acc": 0.5}, {}, samples=100)  # no stderr from lm-eval: the binomial one
    assert accuracy_stderr(given) == 0.03 and accuracy_stderr(counted) == pytest.approx(0.05)
    assert mean_accuracy_stderr([given, counted]) == pytest.approx((0.03**2 + 0.05**2) ** 0.5 / 2)
    assert mean_accuracy_stderr([TaskResult("c", {}, {}, error="failed"), given]) == 0.03  # a failed task: no term
    assert ratio_stderr(0.5, 0.05, 1.0, 0.0) == pytest.approx(0.05)
    assert ratio_stderr(0.5, None, 1.0, 0.01) is None
    summary = {"tasks": ["a"], "models": {
        "unpruned": {"results": {"a": given.to_dict()}, "mean_acc": 0.6, "mean_acc_stderr": 0.03},
        "best": {"results": {"a": counted.to_dict()}, "mean_acc": 0.5, "mean_acc_stderr": 0.05}}}
    table = "\n".join(accuracy_table(summary))
    assert "| best | 0.500 ± 0.050 | 0.500 ± 0.050 | 83.3% ± " in table
    assert "| unpruned | 0.600 ± 0.030 | 0.600 ± 0.030 | 100.0% |" in table


def test_lm_evals_own_output_goes_to_the_log_not_the_console(non_uniform, tiny_tokenizer, tiny_tasks, tmp_path,
                                                            capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside a git repository: lm-eval's `git describe` complains on stderr
    log = tmp_path / "logs" / "tasks.log"
    out = evaluate_tasks(non_uniform, tiny_tokenizer, ["tiny-lastword"], local=tiny_tasks, limit=2, log=log)
    assert out[0].error is None
    console = capfd.readouterr()
    assert "Running loglikelihood requests" not in console.err + console.out
    assert "not a git repository" not in console.err  # a subprocess's output, caught at the file descriptor
    assert "Running loglikelihood requests" in log.read_text()  # kept, where the report says
    evaluate_tasks(non_uniform, tiny_tokenizer, ["tiny-lastword"], local=tiny_tasks, limit=2)  # no log: as before
    assert "Running loglikelihood requests" in capfd.readouterr().err
