"""Shared fixtures: a tiny randomly initialised LLaMA-family model and tokenizer, built in the test, and the
service's databases and allowed roots (helpers to import are in ``helpers.py``).

The tiny model keeps the shapes that matter for pruning (GQA with 2 query heads per KV head, several
layers, an MLP wider than the hidden size) while running in milliseconds on a CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import drop_postgres, make_documents, make_text, make_tiny_model, postgres_url_or_skip
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(4000, seed) for seed in range(3)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    return fast


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of 40 plain-text documents: a text source for the commands (``--calib FOLDER:N``)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_documents(40, words_per_doc=200)):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, request):
    """Fast tests get their own cache; real-model tests share the user's cache (the model is big)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session", autouse=True)
def no_shipped_priors():
    """Searches in tests start from no shipped priors (what bench/priors.py derives changes when it is re-run;
    a test of the priors gives its own: tests/test_start.py). Session-wide, so module fixtures' searches too."""
    from adapruner.search import start

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(start, "shipped_priors", lambda: {"derivation": "none in the tests", "priors": []})
        yield


# -- the service's fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_url():
    url = postgres_url_or_skip()
    yield url
    drop_postgres(url)


@pytest.fixture(scope="session")
def roots(tmp_path_factory, tiny_model_dir):
    """models_root with the tiny model (a copy: a symlink out of the root would be refused) and texts_root."""
    base = tmp_path_factory.mktemp("roots")
    shutil.copytree(tiny_model_dir, base / "models" / "tiny")
    (base / "models" / "fake.gguf").write_bytes(b"not a model")  # things that are not models
    (base / "models" / "empty").mkdir()
    corpus = base / "texts" / "toy"
    corpus.mkdir(parents=True)
    for i, doc in enumerate(make_documents(40, words_per_doc=200)):
        (corpus / f"doc{i:02d}.txt").write_text(doc)
    (base / "texts" / "loop").symlink_to(base / "texts" / "loop")  # a symlink loop inside a root
    return base


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database(request, tmp_path):
    """A new, empty database of the test's own, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    url = postgres_url_or_skip()
    yield url
    drop_postgres(url)
