"""Channel selection on a Gram matrix ``G = X^T X`` of per-channel contributions (ThiNet).

``X`` (samples x channels) holds each input channel's contribution to a consumer's output at sampled
positions, so the consumer's bias-free output there is ``y = X @ 1`` and ``X^T y = G @ 1``. Everything
ThiNet needs is a function of ``G`` alone, so ``X`` never has to be stored:

* :func:`backward_order`: ICCV 2017 eq. 6, greedy removal. ``T`` grows by the channel ``c`` that
  minimises ``||X[:, T + c] 1||^2 = s_T + 2 (G 1_T)_c + G_cc``; one O(C) step per removal with the
  running vector ``G 1_T``.
* :func:`forward_order`: TPAMI 2018, forward selection with a least-squares refit (OMP): pick the
  ``j`` maximising ``(x_j^T r)^2 / x_j^T x_j`` with ``x_j^T r = b_j - G_jS w_S`` and ``b = G 1``,
  then refit ``w_S``; an incremental Cholesky factor keeps each step O(C |S|).
* :func:`least_squares`: ``argmin_w ||X_S w - y||``, by Cholesky on ``G_SS + ridge I``.
* :func:`sampled_error`: ``||X_S w - y||^2`` (``w = 1``: plain removal).

Examples
--------
>>> import numpy as np
>>> X = np.array([[1.0, 0.1, 2.0], [1.0, -0.1, 0.0]])
>>> G = X.T @ X
>>> backward_order(G).tolist()  # channel 1 contributes least, then channel 0
[1, 0, 2]
>>> round(sampled_error(G, [0, 2]), 6), round(sampled_error(G, [0, 2], least_squares(G, [0, 2])), 6)
(0.02, 0.0)
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["backward_order", "forward_order", "least_squares", "sampled_error", "ranks"]


def _check(G: np.ndarray) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square matrix, got shape {G.shape}")
    return G


def backward_order(G: np.ndarray) -> np.ndarray:
    """All ``C`` channels in ICCV greedy removal order (first = removed first; the last one is the
    channel the greedy would keep alone). Ties go to the lowest index, as ``argmin`` does."""
    G = _check(G)
    C = G.shape[0]
    diag = G.diagonal().copy()
    v = np.zeros(C)  # G @ 1_T
    s = 0.0  # ||X 1_T||^2
    left = np.ones(C, dtype=bool)
    order = np.empty(C, dtype=np.int64)
    for step in range(C):
        cost = s + 2.0 * v + diag
        cost[~left] = np.inf
        c = int(np.argmin(cost))
        order[step] = c
        s = float(cost[c])
        v += G[:, c]
        left[c] = False
    return order


def forward_order(G: np.ndarray, ridge: float = 1e-8) -> np.ndarray:
    """All ``C`` channels in TPAMI forward-selection order (first = most important).

    ``ridge`` is relative to the mean diagonal of ``G``. Channels that contribute nothing
    (``G_jj == 0``) come last, in index order."""
    G = _check(G)
    C = G.shape[0]
    b = G.sum(axis=1)
    diag = G.diagonal().copy()
    lam = ridge * max(float(diag.mean()), 0.0) if C else 0.0
    live = diag > 0
    left = live.copy()
    chosen: list[int] = []
    L = np.zeros((C, C))  # lower Cholesky factor of G_SS + lam I, top-left |S| x |S|
    w = np.zeros(0)
    for _ in range(int(live.sum())):
        corr = b - G[:, chosen] @ w if chosen else b.copy()
        gain = np.where(left, corr**2 / np.where(live, diag, 1.0), -np.inf)
        j = int(np.argmax(gain))
        k = len(chosen)
        if k:
            l = scipy.linalg.solve_triangular(L[:k, :k], G[chosen, j], lower=True, check_finite=False)
            d2 = diag[j] + lam - float(l @ l)
            L[k, :k] = l
        else:
            d2 = diag[j] + lam
        L[k, k] = np.sqrt(max(d2, 1e-300))
        chosen.append(j)
        left[j] = False
        w = scipy.linalg.cho_solve((L[: k + 1, : k + 1], True), b[chosen], check_finite=False)
    dead = np.flatnonzero(~live)
    return np.concatenate([np.asarray(chosen, dtype=np.int64), dead])


def ranks(order: np.ndarray, least_first: bool = True) -> np.ndarray:
    """Scores from an order: removing the ``k`` lowest scores removes the order's first ``k``
    (``least_first``) or its last ``k`` (an importance order)."""
    order = np.asarray(order, dtype=np.int64)
    score = np.empty(len(order), dtype=np.float64)
    pos = np.arange(len(order), dtype=np.float64)
    score[order] = pos if least_first else len(order) - 1 - pos
    return score


def least_squares(G: np.ndarray, keep, ridge: float = 1e-8) -> np.ndarray:
    """``w = argmin ||X_S w - X 1||`` for the kept channels ``S`` (in the order given):
    ``(G_SS + ridge * mean(diag G) I) w = (G 1)_S``, by Cholesky (least squares if that fails)."""
    G = _check(G)
    S = np.asarray(keep, dtype=np.int64)
    Gss = G[np.ix_(S, S)]
    rhs = G[S, :].sum(axis=1)
    lam = ridge * max(float(G.diagonal().mean()), 0.0) if G.size else 0.0
    A = Gss + lam * np.eye(len(S))
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, lower=True, check_finite=False), rhs, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(A, rhs, rcond=None)[0]


def sampled_error(G: np.ndarray, keep, w: np.ndarray | None = None) -> float:
    """``||X_S w - X 1||^2`` from ``G`` (``w = 1``: the error of removing the other channels)."""
    G = _check(G)
    C = G.shape[0]
    coef = -np.ones(C)
    S = np.asarray(keep, dtype=np.int64)
    coef[S] += 1.0 if w is None else np.asarray(w, dtype=np.float64)
    return float(max(coef @ G @ coef, 0.0))
