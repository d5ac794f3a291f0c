"""GLUE metrics with scikit-learn / scipy (`evaluate` fetches its scripts from the hub, so it cannot serve offline).

Names: accuracy, f1 (positive class 1), mcc (Matthews), pearson, spearman. Keys in logs are
`eval/<metric><suffix>`, e.g. `eval/accuracy_mm` for MNLI mismatched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman")


def compute_metrics(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`predictions` are class ids (classification) or scores (regression)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name in ("pearson", "spearman"):
            # max == min, not std == 0: the std of n equal floats can be an ulp above 0 (the mean rounds)
            if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
                out[name] = 0.0  # undefined for a constant predictor; 0 is what "no correlation" means here
            else:
                fn = pearsonr if name == "pearson" else spearmanr
                out[name] = float(fn(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}")
    return out
