"""Means with standard errors, and paired differences: the statistics of the sweep, the flatness meter and the toy-world tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` units with its standard error (sample s.d. / √n; NaN when n < 2)."""

    mean: float
    sem: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sem": None if math.isnan(self.sem) else self.sem, "n": self.n}

    def text(self, digits: int = 3) -> str:
        """`mean ± sem` with `digits` decimals, or in scientific notation when the value is below 0.01."""
        if self.n == 0:
            return "–"
        small = 0 < max(abs(self.mean), 0 if math.isnan(self.sem) else self.sem) < 0.01
        spec = f".{digits - 1}e" if small else f".{digits}f"
        if math.isnan(self.sem):
            return f"{self.mean:{spec}}"
        return f"{self.mean:{spec}} ± {self.sem:{spec}}"


def mean_sem(values: Sequence[float]) -> Estimate:
    """Mean and standard error of `values` (NaNs dropped)."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def paired_difference(treated: dict, baseline: dict) -> Estimate:
    """Mean ± s.e. of `treated[u] − baseline[u]` over the units `u` (e.g. (subject, seed)) present in both."""
    units = [u for u in treated if u in baseline and treated[u] is not None and baseline[u] is not None]
    return mean_sem([treated[u] - baseline[u] for u in units])
