"""The built-in SmolLM2-135M pruned at 20% and exported to GGUF: llama.cpp's perplexity on the built-in test
windows within 1% of ours (f16, per-layer sizes; and with depth pruning), and a chat completion through the
chat template the file carries (slow; CI runs these)."""

from dataclasses import replace

import pytest
from test_gguf_export import llama_cpp_or_skip

from adapruner.data import build_pool, load_source
from adapruner.export import save_pruned
from adapruner.importance import Mixture
from adapruner.models import load_model
from adapruner.plan import Allocation
from adapruner.repair import Repair
from adapruner.session import PruneConfig, PruningSession
from adapruner.to_gguf import read_layout, write_gguf

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def session():
    llama_cpp_or_skip()
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    books = load_source("builtin:books")
    pool = build_pool(tokenizer, [(books, 8)], seq_len=128, seed=0)
    return PruningSession(model, tokenizer, pool, [books], model_name="smollm2-135m", max_eval_windows=16,
                          progress=False)


def export(session, allocation, tmp_path_factory, name):
    config = PruneConfig(Mixture({"wanda_sp": 1.0}), tuple(range(len(session.pool))), allocation, Repair("bias"))
    pruned, plan = session.prune(config, 0.2)
    folder = save_pruned(pruned, session.tokenizer, tmp_path_factory.mktemp(name) / "model")
    return pruned, plan, write_gguf(folder, folder.parent / f"{name}.gguf", "f16", progress=False)


@pytest.fixture(scope="module")
def width(session, tmp_path_factory):
    allocation = replace(Allocation.named("layer_range", 3, -2), strength=0.5)  # layer range + adaptive allocation
    return export(session, allocation, tmp_path_factory, "width")


@pytest.fixture(scope="module")
def depth(session, tmp_path_factory):
    return export(session, Allocation(drop_layers=2), tmp_path_factory, "depth")


@pytest.mark.parametrize("which", ["width", "depth"])
def test_llama_cpp_perplexity_of_the_f16_export_is_within_one_percent_of_ours(which, request, session):
    from adapruner.llama_runtime import gguf_perplexity

    pruned, plan, path = request.getfixturevalue(which)
    layout = read_layout(path.parent / "model")
    assert layout.arch == "deci" and len(set(layout.ff)) > 1
    assert len(layout.ff) == 30 - len(plan.dropped) and (len(plan.dropped) == 2) == (which == "depth")
    ours = session.perplexity(pruned, "test")
    theirs = gguf_perplexity(path, session.windows("test"), threads=2)
    assert theirs.tokens == ours.tokens
    assert abs(theirs.ppl / ours.ppl - 1) <= 0.01, (theirs.ppl, ours.ppl)


def test_the_export_carries_the_chat_template_and_answers_a_chat(width):
    from adapruner.llama_runtime import load_gguf

    llm = load_gguf(width[2], n_ctx=256, logits_all=False, threads=2)
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    reply = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=12, temperature=0.0)
    text = reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["message"]["role"] == "assistant" and text.strip()
    assert "<|im_start|>" not in text and "<|im_end|>" not in text  # the template's markers are special tokens
    llm.close()
