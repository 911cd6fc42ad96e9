"""Domains of inputs and parameters: what values are allowed, as one table.

A domain gives the SymPy assumptions of a symbol (so ``Abs(delta)`` simplifies to ``delta``
for a positive parameter), the membership test used to validate parameters, and the set
that the verification stage samples points from.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Domain:
    name: str
    text: str                      # how errors and docs describe it
    assumptions: dict              # SymPy symbol assumptions
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False
    values: tuple[float, ...] = ()  # a finite set, when non-empty

    def mask(self, values: np.ndarray) -> np.ndarray:
        """Elementwise ``contains``, for arrays."""
        if self.values:
            return np.isin(values, self.values)
        above = values >= self.low if self.low_closed else values > self.low
        below = values <= self.high if self.high_closed else values < self.high
        return above & below

    @property
    def extremes(self) -> tuple[float, ...]:
        """The stress grid of this domain: 0, tiny, small, moderate and huge magnitudes, and
        for probabilities the ends of [0, 1] and the values next to them."""
        if self.values:
            return self.values
        if self.high == 1.0:
            grid = (0.0, 1e-300, 1e-16, 0.5, 1 - 1e-16, 1.0)
            if self.low == -1.0:  # [-1, 1]: both ends and the values next to them
                grid = grid + tuple(-x for x in grid[1:])
        else:
            magnitudes = (1e-300, 1e-8, 1.0, 20.0, 40.0, 100.0, 700.0, 745.0, 1e10, 1e300)
            grid = (0.0,) + magnitudes + tuple(-m for m in magnitudes)
            grid = grid + tuple(e for e in (self.low, self.high) if math.isfinite(e) and e not in grid)
        return tuple(x for x in grid if self.contains(x))

    def contains(self, x: float) -> bool:
        if math.isnan(x):
            return False
        if self.values:
            return x in self.values
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("real", "a finite real number", {"real": True}, low_closed=False),
    Domain("positive", "positive (> 0)", {"positive": True}, low=0.0),
    Domain("nonnegative", "non-negative (>= 0)", {"nonnegative": True}, low=0.0, low_closed=True),
    Domain("nonpositive", "non-positive (<= 0), e.g. a log-probability", {"nonpositive": True}, high=0.0,
           high_closed=True),
    Domain("unit_interval", "in [0, 1]", {"nonnegative": True}, low=0.0, high=1.0,
           low_closed=True, high_closed=True),
    Domain("open_unit_interval", "in (0, 1)", {"positive": True}, low=0.0, high=1.0),
    Domain("probability", "a probability in [0, 1]", {"nonnegative": True}, low=0.0, high=1.0,
           low_closed=True, high_closed=True),
    Domain("cosine", "a cosine in [-1, 1]", {"real": True}, low=-1.0, high=1.0, low_closed=True,
           high_closed=True),
    # row-wise losses over embeddings (norms, cosines): squares, products and cubes of norms of
    # rows of up to 1e6 elements stay finite (a scaled norm would lift the bound)
    Domain("embedding", "an embedding coordinate, |x| <= 1e50", {"real": True}, low=-1e50, high=1e50,
           low_closed=True, high_closed=True),
    Domain("label01", "a label in {0, 1}", {"nonnegative": True}, values=(0.0, 1.0)),
    Domain("label_pm1", "a label in {-1, 1}", {"real": True}, values=(-1.0, 1.0)),
    # a row-wise loss's integer target: which element of the row (checked against C at run time)
    Domain("class_index", "an integer class index in [0, C)", {"integer": True, "nonnegative": True},
           low=0.0, low_closed=True),
)}


def domain_names() -> str:
    return ", ".join(sorted(DOMAINS))


def axis_ranges(spec) -> dict:
    """{symbol: (low, high)} of a row-wise spec's axis inputs whose domain is an interval (the
    ranges :func:`nonnegative_on` reads)."""
    return {spec.symbols[i.name]: (DOMAINS[i.domain].low, DOMAINS[i.domain].high) for i in spec.inputs
            if i.axis and not DOMAINS[i.domain].values}


def nonnegative_on(summand, ranges: dict) -> bool:
    """Is ``summand`` >= 0 wherever its symbols are in ``ranges`` ({symbol: (low, high)})? By
    interval arithmetic (sympy.AccumBounds) on the summand, its factored form and its Horner
    forms (p + y - p y is p + y (1 - p), in [0, 2] for probabilities). Generation time only:
    SymPy is imported here, not with the runtime (``import lossgen`` stays light)."""
    import sympy as sp

    if summand.is_nonnegative:
        return True
    boxes = {s: sp.AccumBounds(*bounds) for s, bounds in ranges.items() if s in summand.free_symbols}
    if set(boxes) != summand.free_symbols:
        return False
    symbols = sorted(boxes, key=sp.default_sort_key)
    forms = [summand, sp.factor(summand)] + [sp.horner(summand, wrt=s) for s in symbols]
    for form in forms:
        value = form.xreplace(boxes)
        low = value.min if isinstance(value, sp.AccumBounds) else value
        if low.is_nonnegative:
            return True
    # a polynomial of degree at most 1 in each symbol takes its least value on a box at a corner
    # (p + y - 2 p y of probabilities: 0 at (0, 0) and (1, 1); interval arithmetic gives [-2, 2])
    if summand.is_polynomial(*symbols) and all(sp.degree(summand, s) <= 1 for s in symbols) \
            and all(math.isfinite(b) for s in symbols for b in ranges[s]) and len(symbols) <= 8:
        corners = itertools.product(*(ranges[s] for s in symbols))
        return all(summand.xreplace(dict(zip(symbols, c))) >= 0 for c in corners)
    return False
