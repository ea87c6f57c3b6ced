"""Clustering quality of pseudo-labels against true identities: ACC (Hungarian), purity, NMI, ARI.

Segue's unsupervised scenario works as long as clustering accuracy exceeds the paper's threshold
(`SEGUE_ACCURACY_THRESHOLD`, 0.8); the accuracy meant there is the
standard unsupervised clustering accuracy, i.e. the best *one-to-one* matching of clusters to classes (Hungarian
algorithm), which is what :func:`cluster_accuracy` computes.

When the number of clusters differs from the number of classes the two accuracies part ways:

* one-to-one (Hungarian) accuracy: each class is matched to at most one cluster and vice versa; points of
  unmatched clusters count as errors. Over-clustering (m * K clusters) is penalised: splitting every identity in
  two pure halves scores about 0.5.
* many-to-one accuracy, i.e. **purity**: every cluster is mapped to its majority class, several clusters may share
  a class. Over-clustering is never penalised (N singleton clusters score 1.0), so purity alone says nothing about
  whether K was right; report it next to the Hungarian accuracy.

Labels may be any integers (or other sortable values); they need not be contiguous and the two label sets need not
share ids. Pure numpy/scipy/scikit-learn; no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "SEGUE_ACCURACY_THRESHOLD",
    "ari",
    "cluster_accuracy",
    "clustering_report",
    "contingency_matrix",
    "hungarian_mapping",
    "nmi",
    "purity",
]

# The paper's condition for pseudo-labels to be good enough: clustering accuracy strictly above this.
SEGUE_ACCURACY_THRESHOLD = 0.8


def _encode(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate and map both label arrays to 0..n-1: (true_codes, pred_codes, classes, clusters)."""
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {t.shape} and {p.shape}")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("labels must not be empty")
    classes, t_codes = np.unique(t, return_inverse=True)
    clusters, p_codes = np.unique(p, return_inverse=True)
    return t_codes.astype(np.int64), p_codes.astype(np.int64), classes, clusters


def contingency_matrix(y_true: Any, y_pred: Any) -> np.ndarray:
    """Counts (n_clusters, n_classes): entry [i, j] is the number of points of cluster i with class j.

    Rows and columns follow the sorted unique values of y_pred and y_true. Dense: 10k x 10k takes 800 MB.
    """
    t, p, classes, clusters = _encode(y_true, y_pred)
    flat = np.bincount(p * len(classes) + t, minlength=len(clusters) * len(classes))
    return flat.reshape(len(clusters), len(classes)).astype(np.int64)


def hungarian_mapping(y_true: Any, y_pred: Any) -> dict[Any, Any]:
    """One-to-one cluster -> class matching maximising the number of agreeing points.

    Clusters left without a class (more clusters than classes) are absent from the dict. Uses scipy's
    linear_sum_assignment on the dense contingency matrix: O(n^3) in the number of clusters/classes.
    """
    _, _, classes, clusters = _encode(y_true, y_pred)
    cm = contingency_matrix(y_true, y_pred)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    return {clusters[r].item(): classes[c].item() for r, c in zip(rows, cols, strict=True)}


def cluster_accuracy(y_true: Any, y_pred: Any) -> float:
    """Unsupervised clustering accuracy: fraction of points correct under the best one-to-one matching.

    Works for any numbers of clusters and classes; with more clusters than classes the extra clusters' points are
    errors (see the module docstring; use :func:`purity` for the many-to-one view).
    """
    cm = contingency_matrix(y_true, y_pred)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    return float(cm[rows, cols].sum() / cm.sum())


def purity(y_true: Any, y_pred: Any) -> float:
    """Many-to-one accuracy: each cluster votes for its majority class; fraction of points in that class."""
    cm = contingency_matrix(y_true, y_pred)
    return float(cm.max(axis=1).sum() / cm.sum())


def nmi(y_true: Any, y_pred: Any) -> float:
    """Normalised mutual information (arithmetic normalisation, scikit-learn's default), in [0, 1]."""
    from sklearn.metrics import normalized_mutual_info_score

    t, p, _, _ = _encode(y_true, y_pred)
    return float(normalized_mutual_info_score(t, p))


def ari(y_true: Any, y_pred: Any) -> float:
    """Adjusted Rand index: 1 for identical partitions, about 0 for random ones (can be negative)."""
    from sklearn.metrics import adjusted_rand_score

    t, p, _, _ = _encode(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


def clustering_report(
    y_true: Any, y_pred: Any, threshold: float = SEGUE_ACCURACY_THRESHOLD
) -> dict[str, float | int | bool]:
    """All clustering metrics in one JSON-ready dict.

    Keys: accuracy (Hungarian, one-to-one), purity (many-to-one), nmi, ari, n_clusters, n_classes, n_samples,
    threshold and meets_segue_threshold (accuracy > threshold; the paper's condition uses the one-to-one accuracy,
    which over-clustering cannot inflate).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    cm = contingency_matrix(y_true, y_pred)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    n = int(cm.sum())
    accuracy = float(cm[rows, cols].sum() / n)
    return {
        "accuracy": accuracy,
        "purity": float(cm.max(axis=1).sum() / n),
        "nmi": nmi(y_true, y_pred),
        "ari": ari(y_true, y_pred),
        "n_clusters": int(cm.shape[0]),
        "n_classes": int(cm.shape[1]),
        "n_samples": n,
        "threshold": float(threshold),
        "meets_segue_threshold": bool(accuracy > threshold),
    }
