"""Distance of a quantized model's tensors from fp32 (numpy, float64 accumulation)."""

from __future__ import annotations

import numpy as np


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    """Cosine similarity of two tensors taken as flat vectors (1.0 when both are zero)."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(test, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def row_cosines(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine per last-axis row: [..., C] x [..., C] -> [...]; the worst row shows a broken token."""
    a = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    b = np.asarray(test, np.float64).reshape(-1, test.shape[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    both_zero = (na == 0) & (nb == 0)
    out = np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))
    return out.reshape(ref.shape[:-1])


def max_abs(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ref, np.float64) - np.asarray(test, np.float64))))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_test) per row of [..., vocab] logits, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def top1_agreement(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per row of [..., vocab]: 1.0 where both argmaxes agree."""
    return (np.argmax(ref_logits, -1) == np.argmax(test_logits, -1)).astype(np.float64)


def common_prefix_fraction(ref_ids: np.ndarray, test_ids: np.ndarray) -> float:
    """Share of `ref_ids` that `test_ids` reproduces before the first different token."""
    ref, test = np.asarray(ref_ids).ravel(), np.asarray(test_ids).ravel()
    if ref.size == 0:
        return 1.0
    n = min(ref.size, test.size)
    diff = np.nonzero(ref[:n] != test[:n])[0]
    return float((diff[0] if diff.size else n) / ref.size)
