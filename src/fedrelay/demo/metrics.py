"""Binary classification metrics in plain torch (no scikit-learn): the clinical set for pneumonia.

Recall (sensitivity) matters most clinically, precision and F1 show the false-alarm cost, AUROC is
threshold-free. Degenerate cases (no positives, no predictions) give 0.0 or 0.5, never NaN, since
NaN is not a valid metric on the wire.
"""

from __future__ import annotations

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic, ties counted as half."""
    labels = labels.bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores, dtype=torch.float64)
    # Average ranks over ties.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    starts = ends - counts.to(torch.float64) + 1
    avg = (starts + ends) / 2
    ranks[order] = avg[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor, loss: float) -> dict[str, float]:
    """loss, accuracy, precision, recall, F1 (threshold 0.5) and AUROC."""
    labels = labels.float()
    probs = torch.sigmoid(logits.float())
    preds = (probs >= 0.5).float()
    tp = float((preds * labels).sum())
    fp = float((preds * (1 - labels)).sum())
    fn = float(((1 - preds) * labels).sum())
    total = labels.numel()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "loss": float(loss),
        "accuracy": float((preds == labels).float().mean()) if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(probs, labels),
    }
