"""A floor on the chosen model's decode speed (``SearchJob.min_speedup``): the smallest decode tokens/s over the
unpruned model's that the chosen model must reach, where it will be served.

Perplexity alone never asks for depth: at 40% a search drops no layer, and on some machines a model cut in width
alone decodes hardly faster in llama.cpp (on others it does; docs/results.md). With a floor, the study first
measures a decode-time model (:mod:`adapruner.decode_time`: probe models timed in llama.cpp at the job's GGUF type,
q4_k_m unless it exports another, when llama-cpp-python is installed; else in torch where the search runs), once,
stored with the study for every process. Then:

* the layers dropped are searched from the fewest with which the target can meet the floor up to half the
  layers (:func:`drop_range`): at a given target the kept layers' weights are fixed, so the predicted speed-up
  depends on the kept layers alone, and almost every trial meets it;
* a searched trial whose plan is predicted below the floor stops before validation (pruned);
* the final choice is made among the trials that meet it (:func:`~.record.meets_floor`), and the early-stopping
  pruner compares a trial only with those; baselines, which drop no layer, are scored and reported beside it.

The prediction is a model; what the chosen model really does is measured after the search (the report's "What
the pruned models buy", llama.cpp figures included), never searched on.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import optuna

from ..decode_time import DecodeTime, measure_decode_time
from ..errors import AdaPrunerError
from ..plan import params_to_remove
from ..session import PruningSession
from ..structure import ModelStructure
from ..to_gguf import llama_cpp_module
from .job import SearchJob
from .record import StudyKey

SPEED_GGUF_TYPE = "q4_k_m"  # what the floor is measured at in llama.cpp, unless the job exports another type
MARGIN = 0.005  # the fewest drops are those predicted at least this much above the floor (rounding of a plan)


def speed_runtime(job: SearchJob) -> tuple[str, str]:
    """``(runtime, GGUF type)`` the floor is measured in: llama.cpp when its binding is installed, else torch."""
    try:
        llama_cpp_module()
    except AdaPrunerError:
        return "torch", ""
    return "llama.cpp", job.gguf_type if job.export_format == "gguf" else SPEED_GGUF_TYPE


def study_decode_time(study: optuna.Study, session: PruningSession, job: SearchJob,
                      lock: AbstractContextManager) -> DecodeTime | None:
    """The study's decode-time model, measured once and stored with the study for every process (``None`` for a job
    without a floor). Measured outside ``lock`` (the study lock: a minute of probes must not hold a database
    transaction open); the first process to store its measurement wins, and every process uses that one."""
    if job.min_speedup is None:
        return None
    stored = study.user_attrs.get(StudyKey.DECODE_TIME)
    if stored is None:
        if session.on_step is not None:
            session.on_step("decode time", 0, 1)
        runtime, quant = speed_runtime(job)
        measured = measure_decode_time(session.model, session.tokenizer, runtime, quant)
        with lock:
            stored = study.user_attrs.get(StudyKey.DECODE_TIME)
            if stored is None:
                stored = measured.to_dict()
                study.set_user_attr(StudyKey.DECODE_TIME, stored)
    return DecodeTime.from_dict(stored)


def drop_range(structure: ModelStructure, target: float | int, max_drop: int, decode_time: DecodeTime | None,
               min_speedup: float | None) -> tuple[int, int]:
    """``(fewest, most)`` whole layers a trial may drop: ``(0, max_drop)`` without a floor; with one, from the
    fewest predicted to meet it to ``max_drop`` (an error, before any trial, when even those fall short)."""
    if decode_time is None or min_speedup is None:
        return 0, max_drop
    n_layers = len(structure.layers)
    weights = sum(shape.params for shape in structure.layers) - params_to_remove(structure, target)
    for drop in range(max_drop + 1):
        if decode_time.speedup(n_layers - drop, weights) >= min_speedup * (1 + MARGIN):
            return drop, max_drop
    best = decode_time.speedup(n_layers - max_drop, weights)
    raise AdaPrunerError(f"min_speedup {min_speedup:g} is out of reach at this target: dropping {max_drop} of "
                         f"{n_layers} layers is predicted to decode {best:.2f}x as fast in {decode_time.runtime}; "
                         "ask for less, or remove more")
