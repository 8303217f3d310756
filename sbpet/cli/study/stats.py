"""Paired statistics for the study, in plain Python (no SciPy): Student's t quantiles, the exact
sign test, the t interval of a mean paired difference and the smallest effect a design can detect."""

from __future__ import annotations

import math

__all__ = ["mean_std", "t_quantile", "sign_test", "paired_summary"]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN where undefined)."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom: the regularised incomplete beta
    function by its continued fraction (Lentz), accurate to ~1e-12."""
    if x == 0:
        return 0.5
    z = df / (df + x * x)
    a, b = df / 2.0, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(z) + b * math.log1p(-z))
    # I_z(a, b) by the continued fraction (valid for z < (a + 1) / (a + b + 2); else by symmetry).
    flip = z >= (a + 1) / (a + b + 2)
    if flip:
        a, b, z = b, a, 1 - z
    tiny, c, d = 1e-300, 1.0, 1 - (a + b) * z / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * z / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * z / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    tail_ib = front * f / a  # I_z(a, b) of the (possibly flipped) arguments
    ib = 1 - tail_ib if flip else tail_ib  # I_{df/(df+x^2)}(df/2, 1/2) = P(|T| > |x|)
    return 1 - ib / 2 if x > 0 else ib / 2


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` >= 1 degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def sign_test(differences) -> float:
    """Two-sided exact sign test of a zero median: ties (zero differences) dropped; 1.0 when none is left."""
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_summary(differences, level: float = 0.95, power: float = 0.8) -> dict:
    """Paired differences (regularised minus vanilla, one per seed) summarised: ``n``, ``mean``,
    ``std``, the t interval ``low`` / ``high`` at ``level``, ``wins`` / ``ties`` / ``losses``, the
    sign test's two-sided ``p``, and ``detectable``: the smallest true mean difference a paired t
    test at 1 - ``level`` would find with probability ``power`` given this many seeds and this
    spread, (t_{1-a/2} + t_{power}) * std / sqrt(n) (NaN below 2 seeds)."""
    d = list(differences)
    n = len(d)
    mean, std = mean_std(d)
    out = {"n": n, "mean": mean, "std": std, "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
           "losses": sum(x < 0 for x in d), "p": sign_test(d), "low": math.nan, "high": math.nan,
           "detectable": math.nan}
    if n >= 2:
        half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
        out["low"], out["high"] = mean - half, mean + half
        out["detectable"] = (t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1)) * std / math.sqrt(n)
    return out
