"""Known gaps of the row-wise kernels: regions where a kernel does not meet the verification's
relative-error bound, each with the reason, as predicates ``gap(output, point, entry)`` over a
verification point (see :func:`lossgen.verify_rows.check_size`). `lossgen verify` and the tests
report values inside a gap apart ('<output> known gap'); the tests fail once a gap closes.
README, Verification, describes each."""
from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np


def _row_of(point, name):
    return np.array([v for k, v in point.items() if k.rpartition("_")[0] == name])


def _cancels(*terms, factor=1e3):
    """Do ``terms`` cancel to below 1/factor of their magnitudes? A float64 evaluation that
    rounds the terms apart then loses more than 3 of its 16 digits."""
    return sum(abs(t) for t in terms) > factor * abs(sum(terms))


def _cosine_gap(output, point, entry):
    """cosine_embedding's Hessian: an entry (j, l) of a full block with an element x1_j, x2_j,
    x1_l or x2_l subnormal or below the normal range over the square root of the entry's
    denominator D (a**5 b in x1's block, a**3 b**3 between the rows, with a**2 = |x1|**2 + eps,
    b**2 = |x2|**2 + eps): the kernels' outer products divide each factor P(j), Q(l) by it, and a
    factor below the normal range has lost its digits before the exact fallback's test sees the
    entry (at x1 = (1e50, -700), x2 = (0, 1e-300), entry (1, 0) of x2's block, 1e-282, is 0); and
    the Hessian-vector product of a row j that holds such an entry, in either block."""
    if output.startswith("hvp"):
        own = output.split("[")[1].rstrip("]")
        return any(_cosine_gap(f"hess_full[{own},{other}]", point, (entry[0], l))
                   for other in ("x1", "x2") for l in range(len(_row_of(point, "x1"))))
    if not output.startswith("hess_full"):
        return False
    names = output.split("[")[1].split("]")[0].split(",")
    j, l = entry
    # exact: |x1|**2 + eps at x1 = 745 keeps its eps = 1e-12
    first, second = ([Fraction(float(v)) for v in _row_of(point, name)] for name in ("x1", "x2"))
    eps = Fraction(float(point["eps"]))
    a2, b2 = sum(v * v for v in first) + eps, sum(v * v for v in second) + eps
    if names[0] == "x2":
        a2, b2 = b2, a2
    squared = (a2 * b2) ** 3 if names[0] != names[1] else a2 ** 5 * b2  # D**2
    elements = [v for v in (first[j], second[j], first[l], second[l]) if v]
    if squared <= 0:
        return False
    with mpmath.workdps(60):
        factor_scale = mpmath.sqrt(mpmath.sqrt(mpmath.mpf(squared.numerator) / squared.denominator))  # sqrt(D)
        tiny = mpmath.mpf(float(np.finfo(float).tiny))
        size = lambda v: mpmath.mpf(abs(v.numerator)) / v.denominator  # noqa: E731
        return any(size(v) < tiny or size(v) / factor_scale < tiny for v in elements)


def _poly1_gap(output, point, entry):
    """Hessian entries (j, l) of Poly-1 that hold 1 - 2 p_c of a class c among the row's two
    largest, computed as (p_m - p_c) + r (stabilise_rows.tie_difference: m the other of the two,
    r the weights of the rest of the row), where those two terms cancel below 1/1000 of their
    size (p at 50 digits): class c ties for the row's mass with several classes together
    (p = (1/2, 1/4, 1/4)), and each rounded weight of r, accurate alone, has lost the digits of
    their sum. The entries of c on the diagonal and, where c is the true class y, of y's row and
    column (the hvp: every entry of the row)."""
    if not output.startswith(("hess", "hvp")):
        return False
    with mpmath.workdps(50):
        s = [mpmath.mpf(float(v)) for v in _row_of(point, "s")]
        total = mpmath.fsum(mpmath.exp(v - max(s)) for v in s)
        p = [mpmath.exp(v - max(s)) / total for v in s]
        top = sorted(range(len(s)), key=lambda c: (-s[c], c))[:2]
        if len(top) < 2:
            return False
        rest = mpmath.fsum(v for c, v in enumerate(p) if c not in top)
        tied = {c for c, m in (top, top[::-1]) if _cancels(p[m] - p[c], rest)}
    y = int(point["y"])
    return bool(tied) and (output.startswith("hvp") or entry[0] == entry[1] in tied or y in tied and y in entry)


# Row-wise losses: values where a kernel does not meet the bound, and why. (Elementwise:
# tests/test_catalog.py's KNOWN_GAPS, empty.)
ROW_KNOWN_GAPS = {
    "poly1_cross_entropy": (_poly1_gap, "where a class of the row's two largest ties for the row's mass with several "
                                        "classes together (p = (1/2, 1/4, 1/4)), a Hessian entry that holds its "
                                        "1 - 2 p_c = (p_m - p_c) + the rest of the row, whose two terms cancel: the "
                                        "rest is a sum of rounded weights (relative error 4.7e-8 at s = (0, "
                                        "log(1/2), log(1/2) + 1e-9), y = 0, w = 0); reachable only with the weights "
                                        "in more than double precision. A tie of two classes is exact "
                                        "(p_m - p_c from the logits' difference)"),
    "cosine_embedding": (_cosine_gap, "a full Hessian entry with an element below the normal range over the "
                                      "square root of its denominator, and the Hessian-vector product of a row "
                                      "holding one: the kernels' outer products divide each factor P(j), Q(l) by "
                                      "it, and a factor below the normal range has lost its digits before the exact "
                                      "fallback's test sees the entry (x1 = (1e50, -700), x2 = (0, 1e-300): entry "
                                      "(1, 0) of x2's block, 1e-282, is 0): reachable by factors in a binary scale"),
}


def gap_of(name: str):
    """The known-gap predicate of the row-wise loss ``name``, or None."""
    return ROW_KNOWN_GAPS[name][0] if name in ROW_KNOWN_GAPS else None
