"""The numbers the frontier benchmark reports, as pure functions (unit-tested in tests/test_benchmarks.py).

A run's evaluation points are dicts with "kl" and a reward ("gold" or "proxy"). Its *frontier* is the best
reward among points whose KL is within a budget; several runs of one objective and seed (a sweep of KL
coefficient and learning rate) share one frontier: the envelope of all their points.
"""
from __future__ import annotations

import random
import statistics


def frontier_at(points: list[dict], budget: float, key: str = "gold") -> float | None:
    """Best `key` among points with kl <= budget; None when no point is that close to the reference.

    points (kl, gold) = (0, 0.1), (0.7, 0.4), (1.5, 0.3), (3.0, 0.6): budget 1 -> 0.4, budget 2 -> 0.4,
    budget 4 -> 0.6, budget -1 -> None."""
    inside = [p[key] for p in points if p["kl"] is not None and p[key] is not None and p["kl"] <= budget]
    return max(inside) if inside else None


def frontier_auc(points: list[dict], kl_max: float = 8.0, key: str = "gold") -> float | None:
    """Area under the frontier b -> frontier_at(points, b) for b in [0, kl_max], divided by kl_max: the mean best
    reward over KL budgets up to kl_max. The frontier is a step function that rises at each point's KL; a point
    with KL < 0 (the Monte-Carlo KL estimate can dip below 0) counts from 0. None if no point has kl <= 0.

    Same points, kl_max 4: 0.1 on [0, 0.7), 0.4 on [0.7, 3.0), 0.6 on [3.0, 4]:
    (0.1 * 0.7 + 0.4 * 2.3 + 0.6 * 1.0) / 4 = (0.07 + 0.92 + 0.6) / 4 = 0.3975."""
    usable = sorted((max(p["kl"], 0.0), p[key]) for p in points if p["kl"] is not None and p[key] is not None)
    if not usable or usable[0][0] > 0.0:
        return None
    area, best, at = 0.0, None, 0.0
    for kl, value in usable:
        if kl >= kl_max:
            break
        if best is not None:
            area += best * (kl - at)
        best, at = value if best is None else max(best, value), kl
    return (area + best * (kl_max - at)) / kl_max


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and its percentile bootstrap interval (resampling seeds with
    replacement). One value: (v, v, v). Deterministic for a given `seed`.

    [1.0, 2.0, 3.0]: mean 2.0; every resampled mean lies in [1, 3], so 1 <= low <= 2 <= high <= 3."""
    if not values:
        raise ValueError("bootstrap_ci: no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return mean, means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def paired_ci(a: dict[int, float], b: dict[int, float], **kwargs) -> tuple[float, float, float] | None:
    """Bootstrap interval of mean(a[s] - b[s]) over the seeds both have: a paired comparison (same seed = same
    prompt order and sampling stream), so seed-to-seed variation common to both cancels.

    a = {0: 0.7, 1: 0.6}, b = {0: 0.5, 1: 0.5, 2: 0.9}: differences 0.2, 0.1 (seed 2 unpaired): mean 0.15."""
    seeds = sorted(set(a) & set(b))
    return bootstrap_ci([a[s] - b[s] for s in seeds], **kwargs) if seeds else None


def fmt_ci(ci: tuple[float, float, float] | None, digits: int = 3) -> str:
    """'0.600 [0.550, 0.650]'; 'n/a' for None."""
    if ci is None:
        return "n/a"
    mean, low, high = ci
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
