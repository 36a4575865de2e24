"""Adapt-Pruner's incremental schedule: prune a few percent at a time, re-estimate, recover, repeat.

Each step removes the parameters that bring the model to the next point of the schedule (``step``,
``2*step``, ... of the *original* parameter count, the last point being the target itself), with
importance and the layers' input/output similarities re-estimated on the model as it is now, and
an optional short LoRA fine-tune after the step. Because every step's count is computed from the
original size, the model ends at the target exactly (within one MLP channel's parameters).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .data.windows import CalibrationPool
from .errors import AdaPrunerError
from .finetune import LoRA, finetune
from .importance import Mixture
from .plan import Allocation, PruningPlan
from .session import PruneConfig, PruningSession
from .structure import model_structure


@dataclass
class StepRecord:
    """One step of the incremental schedule: where it brought the model and what it cost."""

    target: float  # cumulative share of the original parameters removed after this step
    removed: int  # parameters removed by this step
    params: int  # parameters left
    seconds: float
    finetune_loss: float | None = None


@dataclass
class IncrementalResult:
    """The model after the whole schedule, with each step's plan and record."""

    model: nn.Module
    plans: list[PruningPlan] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def removed_share(self) -> float:
        """Share of the original parameters the whole schedule removed."""
        original = self.steps[0].params + self.steps[0].removed if self.steps else 0
        return 1 - self.steps[-1].params / original if original else 0.0


def schedule(target: float, step: float) -> list[float]:
    """Cumulative targets ``step, 2*step, ..., target``."""
    if not 0 < target < 1:
        raise AdaPrunerError(f"the incremental target must be a fraction in (0, 1), got {target}")
    if not 0 < step <= target:
        raise AdaPrunerError(f"incremental step must be in (0, target], got {step}")
    n = math.ceil(target / step - 1e-9)
    return [min(target, (k + 1) * step) for k in range(n)]


def prune_incrementally(
    model: nn.Module,
    calibration: torch.Tensor,
    mixture: Mixture,
    target: float,
    step: float = 0.05,
    allocation: Allocation = Allocation(strength=0.5),
    lora: LoRA | None = None,
    train_windows: torch.Tensor | None = None,
    progress: bool = True,
) -> IncrementalResult:
    """Prune ``model`` (a copy is made) to ``target`` of its parameters in steps of ``step``.

    ``calibration`` are the windows importance is estimated on (every step, on the current model);
    ``lora`` with ``train_windows`` fine-tunes after every step but the last.
    """
    current = model
    original = model_structure(current).total_params
    result = IncrementalResult(current)
    pool = CalibrationPool(calibration, ("calibration",) * calibration.shape[0])
    config = PruneConfig(mixture, tuple(range(calibration.shape[0])), allocation)
    points = schedule(target, step)
    for k, point in enumerate(points):
        start = time.perf_counter()
        # The session's one pipeline on the model as it is now: statistics re-estimated, nothing cached.
        session = PruningSession(current, None, pool, cache_statistics=False, progress=progress, channel_multiple=1)
        before = session.structure.total_params
        wanted = round(point * original) - (original - before)
        current, plan = session.prune(config, max(wanted, 1))  # a copy: the caller's model stays as it was
        record = StepRecord(point, plan.removed_params, before - plan.removed_params, 0.0)
        if lora is not None and lora.steps and k < len(points) - 1:
            if train_windows is None:
                raise AdaPrunerError("fine-tuning between steps needs training windows")
            tuned = finetune(current, train_windows, lora, progress=progress)
            current = tuned.model
            record.finetune_loss = tuned.final_loss
        record.seconds = time.perf_counter() - start
        result.plans.append(plan)
        result.steps.append(record)
    result.model = current
    return result
