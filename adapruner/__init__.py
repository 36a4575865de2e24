"""AdaPruner: sample-aware structured pruning of LLaMA-family causal LMs, searched by Bayesian optimization."""

__version__ = "0.1.0"
