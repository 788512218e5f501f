"""Random scores: a baseline, and a scorer for rewrite tests that must not depend on weights."""

from __future__ import annotations

import numpy as np

from ._registry import register_method


@register_method("random", "uniform random scores (baseline; seed= option)")
def random_scores(model, graph, groups, data=None, seed: int = 0, **options):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in groups}
