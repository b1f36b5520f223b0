"""Latency statistics: median, p90, p99 and percentile-bootstrap confidence intervals.

Percentiles use numpy's default (linear interpolation between order statistics). A p99 of fewer
than 100 samples is close to the maximum: `n` is always reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = {"median": 50.0, "p90": 90.0, "p99": 99.0}
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `samples`, numpy's linear method."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("percentile of an empty sample")
    return float(np.percentile(values, q))


def bootstrap_ci(samples: Sequence[float], q: float, resamples: int = BOOTSTRAP_RESAMPLES,
                 level: float = CI_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the q-th percentile of `samples`.

    Draws `resamples` samples of size n with replacement (seeded: reproducible), takes the q-th
    percentile of each, and returns the (1 - level) / 2 and (1 + level) / 2 quantiles of those.
    """
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap of an empty sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(resamples, values.size))  # (R, n)
    stats = np.percentile(values[index], q, axis=1)  # (R,)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def summarize(seconds: Sequence[float], scale: float = 1e3, unit: str = "ms",
              seed: int = 0) -> dict[str, float | int | list[float]]:
    """Median / p90 / p99 (each with its bootstrap CI), mean, min, max of timings in seconds,
    reported in `unit` (default milliseconds)."""
    values = np.asarray(seconds, dtype=np.float64) * scale
    out: dict[str, float | int | list[float]] = {"n": int(values.size)}
    for name, q in PERCENTILES.items():
        out[f"{name}_{unit}"] = percentile(values, q)
        out[f"{name}_ci_{unit}"] = list(bootstrap_ci(values, q, seed=seed))
    out[f"mean_{unit}"] = float(values.mean())
    out[f"min_{unit}"] = float(values.min())
    out[f"max_{unit}"] = float(values.max())
    out["ci_level"] = CI_LEVEL
    return out


def ratio(baseline: float, other: float) -> float | None:
    """baseline / other (how many times faster `other` is), None when either is missing."""
    if not baseline or not other:
        return None
    return float(baseline) / float(other)
