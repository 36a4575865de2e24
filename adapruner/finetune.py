"""Fine-tuning after pruning: LoRA (peft), merged back into the pruned weights.

AdaPruner and LLM-Pruner recover a pruned model's quality with a short LoRA run on general text.
Adapters go on every projection (q/k/v/o/gate/up/down) of every layer, whatever its pruned size; the
trained low-rank updates are merged into the weights, so the result is an ordinary pruned model of
the same shapes, saved and reloaded like any other.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from .errors import AdaPrunerError
from .structure import ATTN_MODULES, MLP_MODULES


@dataclass(frozen=True)
class LoRA:
    """A LoRA fine-tuning budget: r=8, alpha=16, dropout=0.05 as LLM-Pruner's recipe; lr 2e-4 (LLM-Pruner's is 1e-4)."""

    steps: int = 100
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 2e-4
    batch_size: int = 4
    warmup_steps: int = 5
    targets: tuple[str, ...] = ATTN_MODULES + MLP_MODULES
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.r < 1 or self.batch_size < 1 or not self.lr > 0:
            raise AdaPrunerError("LoRA needs steps >= 0, r >= 1, batch_size >= 1 and lr > 0")
        if not 0 <= self.dropout < 1:
            raise AdaPrunerError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass
class FinetuneResult:
    """A fine-tuned model (LoRA merged in), the loss of every step and the seconds it took."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """The mean loss of the last 10 steps (one step's loss is noisy)."""
        last = self.losses[-10:]
        return sum(last) / len(last)


def finetune(model: nn.Module, windows: torch.Tensor, lora: LoRA, progress: bool = True) -> FinetuneResult:
    """Train LoRA adapters on ``windows`` (``[n, seq_len]`` training tokens) and merge them.

    Batches are drawn from a seeded shuffle of the windows (cycling when the steps outrun them).
    Runs in the model's dtype; on CUDA under bf16 autocast. Returns the merged model (the adapters
    are gone; the input model is modified in place) and the loss of every step.
    """
    if lora.steps == 0:
        return FinetuneResult(model)
    if windows.shape[0] == 0:
        raise AdaPrunerError("fine-tuning needs training windows")
    device = next(model.parameters()).device
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), task_type="CAUSAL_LM", bias="none")
    torch.manual_seed(lora.seed)
    peft_model = get_peft_model(model, config)
    if lora.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lora.lr, weight_decay=0.0)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < lora.warmup_steps:
            return (step + 1) / lora.warmup_steps
        progress_ = (step - lora.warmup_steps) / max(1, lora.steps - lora.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(lora.seed)
    order: list[int] = []
    losses: list[float] = []
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    start = time.perf_counter()
    peft_model.train()
    bar = tqdm(range(lora.steps), desc="LoRA", unit="step", disable=not progress, leave=False)
    for _ in bar:
        while len(order) < lora.batch_size:
            order += torch.randperm(windows.shape[0], generator=generator).tolist()
        batch, order = order[: lora.batch_size], order[lora.batch_size :]
        ids = windows[batch].to(device)
        with autocast:
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        if not torch.isfinite(loss):
            raise AdaPrunerError(f"LoRA loss became {loss.item()} at step {len(losses)}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    if lora.gradient_checkpointing:
        peft_model.gradient_checkpointing_disable()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return FinetuneResult(merged, losses, time.perf_counter() - start)
