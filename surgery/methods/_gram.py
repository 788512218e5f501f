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

All in float64.
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
import torch

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

    Cholesky-OMP on ``G``: with ``L L^T = G_SS + lam I``, ``Q = G[:, S] L^-T`` and ``z = L^-1 b_S``,
    the correlations are ``x_j^T r = b_j - (Q z)_j``; adding ``j`` appends the row ``l = Q[j]`` to
    ``L``, the column ``(G[:, j] - Q l) / d`` to ``Q`` and one entry to ``z`` (O(C |S|) per pick,
    no triangular solve). ``ridge`` (``lam``) is relative to the mean diagonal of ``G``. Channels that
    contribute nothing (``G_jj == 0``) come last, in index order."""
    G = _check(G)
    C = G.shape[0]
    Gt = torch.from_numpy(G)
    b = Gt.sum(dim=1)
    diag = Gt.diagonal().clone()
    lam = ridge * max(float(diag.mean()), 0.0) if C else 0.0
    live = diag > 0
    left = live.clone()
    norm = torch.where(live, diag, torch.ones_like(diag))
    Q = torch.zeros(C, C, dtype=torch.float64)
    z = torch.zeros(C, dtype=torch.float64)
    corr = b.clone()  # x_j^T r for the current residual r = y - X_S w_S
    chosen: list[int] = []
    for k in range(int(live.sum())):
        gain = torch.where(left, corr**2 / norm, torch.full_like(corr, -torch.inf))
        j = int(torch.argmax(gain))
        l = Q[j, :k]
        d = max(float(diag[j]) + lam - float(l @ l), 1e-300) ** 0.5
        Q[:, k] = (Gt[:, j] - Q[:, :k] @ l) / d
        z[k] = (float(b[j]) - float(l @ z[:k])) / d
        corr -= Q[:, k] * z[k]
        chosen.append(j)
        left[j] = False
    dead = np.flatnonzero(~live.numpy())
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
    ``(G_SS + ridge * mean(diag G) I) w = (G 1)_S``, by Cholesky (least squares if that fails).

    torch's LAPACK, not scipy's: on a busy machine scipy's threaded OpenBLAS waking up after
    torch's own threads costs ~50 ms per call, the factorisation itself well under 1 ms."""
    G = _check(G)
    S = torch.from_numpy(np.asarray(keep, dtype=np.int64))
    Gt = torch.from_numpy(G)
    rhs = Gt[S].sum(dim=1, keepdim=True)
    lam = ridge * max(float(Gt.diagonal().mean()), 0.0) if G.size else 0.0
    A = Gt[S][:, S] + lam * torch.eye(len(S), dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L).squeeze(1).numpy()
    return torch.linalg.lstsq(A, rhs, driver="gelsd").solution.squeeze(1).numpy()


def sampled_error(G: np.ndarray, keep, w: np.ndarray | None = None) -> float:
    """``||X_S w - X 1||^2`` from ``G`` (``w = 1``: the error of removing the other channels)."""
    G = _check(G)
    C = G.shape[0]
    coef = -np.ones(C)
    S = np.asarray(keep, dtype=np.int64)
    coef[S] += 1.0 if w is None else np.asarray(w, dtype=np.float64)
    return float(max(coef @ G @ coef, 0.0))
