"""Scaling laws: the Chinchilla fit (Approach 3), our own sweep of small models, and a
compute planner.

- :func:`fit_chinchilla` -> :class:`ChinchillaFit` (E, A, B, alpha, beta; ``predict``,
  ``compute_optimal``, ``tokens_per_param``, ``at_ratio``, ``bootstrap``);
- :func:`read_runs`: (N, D, L) from a CSV (Epoch AI's digitised Chinchilla runs or a
  sweep's table);
- :mod:`llmcore.scaling.sweep`: a grid of model sizes x compute budgets trained with the
  pretraining loop, fitted and plotted as isoFLOP curves.
"""

from llmcore.scaling.chinchilla import (
    EPOCH_2024,
    ChinchillaFit,
    check_runs,
    fit_chinchilla,
    plan,
    read_runs,
)

__all__ = ["EPOCH_2024", "ChinchillaFit", "check_runs", "fit_chinchilla", "plan", "read_runs"]
