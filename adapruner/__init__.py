"""AdaPruner: sample-aware structured pruning of LLaMA-family causal LMs, searched by Bayesian optimization.

The modules, grouped by the data flow they serve (which may import which, lowest first, is the list in
``tests/test_layering.py``, which fails on an import that points up):

1. **The model**: ``models`` (built-in names, folders, GGUF files: ``fetch``, ``from_gguf``), ``device``,
   ``structure`` (its layers, heads and channels), ``modeling_pruned`` (per-layer sizes for transformers).
2. **The texts**: ``data`` (sources, windows, the calibration pool, held-out text), ``cache``.
3. **Statistics and importance**: ``statistics`` (one pass over the pool), ``importance`` (the metrics and
   their mixture, FLAP's score), ``wanda_sp`` (FLAP's Wanda-sp, layer by layer).
4. **The plan and the pruned model**: ``plan`` (the frozen :class:`~adapruner.plan.PruningPlan`: what each
   layer keeps), ``prune`` (applying it), ``repair`` (putting back what the cut columns carried).
5. **One pipeline**: ``session`` (model + texts -> statistics -> importance -> plan -> pruned model, once),
   ``incremental`` (Adapt-Pruner's schedule over it), ``finetune`` (LoRA after the cut).
6. **Scores**: ``evaluate`` (perplexity), ``tasks`` (lm-evaluation-harness), ``inference_cost`` (speed and
   memory), ``llama_runtime`` (the same in llama.cpp), ``decode_time`` (a pruned model's decode speed predicted
   from its shape, fitted to probe models timed in either runtime).
7. **Out**: ``export`` (a transformers folder), ``to_gguf`` (a GGUF file for llama.cpp).
8. **The search**: ``search`` (the job, the space, the objective, the study and its report over Optuna).
9. **Front ends**: ``cli`` (the ``adapruner`` command). The HTTP service (``service/``) sits above it all and
   is never imported here. ``errors`` and ``quiet`` serve every layer.
"""

__version__ = "0.1.0"
