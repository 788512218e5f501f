"""Random scores: a baseline, and a scorer for rewrite tests that must not depend on weights."""

from __future__ import annotations

import numpy as np

from ._registry import Option, register_method


@register_method("random", "uniform random scores (baseline)", needs=(), options=(Option("seed", int, 0, "random seed"),))
def random_scores(ctx, seed: int):
    """Every channel gets an independent uniform score; the same seed gives the same plan."""
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in ctx.groups}
