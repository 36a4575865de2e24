"""Shared fixtures: a tiny randomly initialised LLaMA-family model and tokenizer, built in the test.

The tiny model keeps the shapes that matter for pruning (GQA with 2 query heads per KV head, several
layers, an MLP wider than the hidden size) while running in milliseconds on a CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a of and to in was she he it that her his with for had not on be as at by but which you all "
    "Elizabeth Darcy Emma Anne house letter sister morning walk dinner ball family friend heart mind "
    "could would should must very much little great good young first last never always every day "
    "said thought felt knew saw came went gave took made found told asked replied answered"
).split()


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-prose: sentences of random words, paragraphs separated by blank lines."""
    rng = random.Random(seed)
    out, sentence = [], []
    for i in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 14):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
        if i % 90 == 89:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


def make_documents(n_docs: int, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    return [make_text(words_per_doc, seed * 100_003 + i) for i in range(n_docs)]


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


def tiny_config(model_type: str = "llama", **overrides):
    base = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if model_type == "qwen2":
        base.update(use_sliding_window=False)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def make_tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    # Random init gives near-uniform predictions; a wider spread makes importance differences visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, request):
    """Fast tests get their own cache; real-model tests share the user's cache (the model is big)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))
