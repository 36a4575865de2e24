import math

import pytest
import torch
from helpers import make_text

from adapruner.data.windows import tokenize_windows
from adapruner.evaluate import perplexity, window_losses


def hf_mean_loss(model, windows):
    """transformers' own loss, one window at a time (the reference recipe)."""
    with torch.no_grad():
        return sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / len(windows)


def test_perplexity_is_exp_of_transformers_loss(tiny_model):
    windows = torch.randint(0, 320, (10, 24), generator=torch.Generator().manual_seed(1))
    result = perplexity(tiny_model, windows, batch_size=4, progress=False)
    reference = hf_mean_loss(tiny_model, windows)
    assert result.nll == pytest.approx(reference, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(reference), rel=1e-6)
    assert result.windows == 10
    assert result.tokens == 10 * 23


def test_batched_loss_matches_transformers_batch_loss(tiny_model):
    windows = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch_loss = tiny_model(input_ids=windows, labels=windows).loss.item()
    assert perplexity(tiny_model, windows, batch_size=6, progress=False).nll == pytest.approx(batch_loss, rel=1e-6)


def test_window_losses_any_order_and_batch(tiny_model):
    windows = torch.randint(0, 320, (7, 16), generator=torch.Generator().manual_seed(3))
    forward = dict(window_losses(tiny_model, windows, batch_size=3))
    order = [6, 0, 3, 5, 1, 2, 4]
    shuffled = list(window_losses(tiny_model, windows, batch_size=2, order=order))
    assert [i for i, _ in shuffled] == order
    for i, nll in shuffled:
        assert nll == pytest.approx(forward[i], rel=1e-5)


def test_perplexity_rejects_empty_windows(tiny_model):
    with pytest.raises(ValueError):
        perplexity(tiny_model, torch.zeros((0, 16), dtype=torch.long), progress=False)


def test_windows_are_consecutive_and_drop_partial(tiny_tokenizer):
    texts = [make_text(300, 1), make_text(300, 2)]
    ids = tiny_tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    windows = tokenize_windows(tiny_tokenizer, texts, seq_len=32)
    assert windows.shape == (ids.numel() // 32, 32)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert tokenize_windows(tiny_tokenizer, texts, seq_len=32, max_windows=3).shape == (3, 32)
