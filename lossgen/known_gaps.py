"""Known gaps of the row-wise kernels: regions where a kernel does not meet the verification's
relative-error bound, each with the reason, as predicates ``gap(output, point, entry)`` over a
verification point (see :func:`lossgen.verify_rows.check_size`). `lossgen verify` and the tests
report values inside a gap apart ('<output> known gap'); the tests fail once a gap closes.
README, Verification, describes each."""
from __future__ import annotations

import mpmath
import numpy as np


def _row_of(point, name):
    return np.array([v for k, v in point.items() if k.rpartition("_")[0] == name])


def _cancels(*terms, factor=1e3):
    """Do ``terms`` cancel to below 1/factor of their magnitudes? A float64 evaluation that
    rounds the terms apart then loses more than 3 of its 16 digits."""
    return sum(abs(t) for t in terms) > factor * abs(sum(terms))


def _ssim_gap(output, point, entry):
    """Off-diagonal Hessian entry (j, l) of global SSIM, 1 - l cs, in the forms the kernel
    differentiates (fuse_rows.hessian_forms): near the target (l cs >= 1/2) l = 1 - P/A,
    P = (mu_x - mu_y)**2, A = mu_x**2 + mu_y**2 + C1, and cs = 1 - V/B, V = var(x - y),
    B = var(x) + var(y) + C2; far from it l = N1/A, N1 = 2 mu_x mu_y + C1, and cs = N2/B,
    N2 = 2 cov(x, y) + C2. The entry, -(l'' cs + l'_j cs'_l + l'_l cs'_j + l cs''), each
    quotient-rule term apart, cancels below 1/1000 of their size: an outer product
    l'_j cs'_l + l'_l cs'_j whose factors cancel by coincidence (C = 2, x = 0: l' is the same at
    both elements and cs'_0 + cs'_1 = 0, where the entry is l'' cs + l cs'' = 2e-7 beside terms
    of 1; C = 3, y = (1e-300, 0.5, 1 - 2**-53), x = (1e-16, 0, 1e-300): y_0 + y_2 - 2 mu_y =
    -3.7e-17, entry (0, 2) relative error 3.2e-10). The diagonal's l'_j cs'_j is one product of
    deviations from the means, accurate since the means' residuals are exact
    (stabilise_rows.mean_residuals: entry (1, 1) there had 1.3e-11). hvp: any entry of the row j."""
    if not output.startswith(("hess_full", "hvp")):
        return False
    x = [mpmath.mpf(float(v)) for v in _row_of(point, "x")]
    y = [mpmath.mpf(float(v)) for v in _row_of(point, "y")]
    n = len(x)
    if output.startswith("hvp"):
        return any(_ssim_gap("hess_full", point, (entry[0], l)) for l in range(n) if l != entry[0])
    if entry[0] == entry[1]:
        return False
    with mpmath.workdps(50):
        return _ssim_entry_gap(x, y, n, entry, mpmath.mpf(point["C1"]), mpmath.mpf(point["C2"]))


def _ssim_entry_gap(x, y, n, entry, c1, c2) -> bool:
    j, l = entry
    delta = 1 if j == l else 0
    mx, my = mpmath.fsum(x) / n, mpmath.fsum(y) / n
    u = mx - my
    var = lambda a, b, ma, mb: mpmath.fsum((p - ma) * (q - mb) for p, q in zip(a, b)) / n  # noqa: E731
    d = [p - q for p, q in zip(x, y)]
    a_, b_ = mx**2 + my**2 + c1, var(x, x, mx, mx) + var(y, y, my, my) + c2
    n1, n2 = 2 * mx * my + c1, 2 * var(x, y, mx, my) + c2
    lum, cs = n1 / a_, n2 / b_
    # first and second derivatives along x_j, x_l of the numerators and denominators
    da, db = (2 * mx / n,) * 2, (2 * (x[j] - mx) / n, 2 * (x[l] - mx) / n)
    dda, ddb = mpmath.mpf(2) / n**2, 2 * (delta - mpmath.mpf(1) / n) / n
    if lum * cs >= mpmath.mpf(1) / 2:  # l = 1 - P/A, cs = 1 - V/B
        sign, f1, f2 = -1, u**2, var(d, d, u, u)
        df1, df2 = (2 * u / n,) * 2, (2 * (d[j] - u) / n, 2 * (d[l] - u) / n)
        ddf1, ddf2 = mpmath.mpf(2) / n**2, ddb
    else:  # l = N1/A, cs = N2/B
        sign, f1, f2 = 1, n1, n2
        df1, df2 = (2 * my / n,) * 2, (2 * (y[j] - my) / n, 2 * (y[l] - my) / n)
        ddf1 = ddf2 = 0

    def first(f, g, df, dg, k):   # terms of (sign f/g)' at element k
        return [sign * df[k] / g, -sign * f * dg[k] / g**2]

    def second(f, g, df, dg, ddf, ddg):   # terms of (sign f/g)''
        return [sign * t for t in (ddf / g, -df[0] * dg[1] / g**2, -df[1] * dg[0] / g**2, -f * ddg / g**2,
                                   2 * f * dg[0] * dg[1] / g**3)]

    terms = [-t * cs for t in second(f1, a_, df1, da, ddf1, dda)]
    terms += [-t * lum for t in second(f2, b_, df2, db, ddf2, ddb)]
    terms += [-s * t for s in first(f1, a_, df1, da, 0) for t in first(f2, b_, df2, db, 1)]
    terms += [-s * t for s in first(f1, a_, df1, da, 1) for t in first(f2, b_, df2, db, 0)]
    return _cancels(*terms)


# Row-wise losses: values where a kernel does not meet the bound, and why. (Elementwise:
# tests/test_catalog.py's KNOWN_GAPS, empty.)
ROW_KNOWN_GAPS = {
    "ssim_global": (_ssim_gap, "an off-diagonal Hessian entry of 1 - l cs (and the product of a row that holds "
                               "one) whose quotient-rule terms cancel below 1/1000 of their size: an outer product "
                               "l'_j cs'_l + l'_l cs'_j that cancels by coincidence, y_j + y_l = 2 mu_y to the last "
                               "digits (relative error 3.2e-10 at C = 3, y = (1e-300, 0.5, 1 - 2**-53), "
                               "x = (1e-16, 0, 1e-300); 2.3e-10 at C = 2, x = (0, 0), y = (0.9, 0.11)), each "
                               "factor rounded apart; not only at special rows: any entry near a zero crossing "
                               "(on uniform rows at C = 16, 1.1% of the rows hold one beyond 1e-12). The exact "
                               "fallback over the row's moments closes it, at 1.8 ms a flagged row (README, known "
                               "gaps); it needs a cheap middle tier"),
}


def gap_of(name: str):
    """The known-gap predicate of the row-wise loss ``name``, or None."""
    return ROW_KNOWN_GAPS[name][0] if name in ROW_KNOWN_GAPS else None
