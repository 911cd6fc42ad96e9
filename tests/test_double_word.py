"""The double-word recomputation of a full Hessian's cancelling entries (lossgen/double_word.py):
its arithmetic against mpmath, the forms it applies to, and global SSIM's entries near their
zero crossings against an independent closed form of the Hessian evaluated by mpmath."""
import mpmath
import numpy as np
import pytest
import sympy as sp

import lossgen
from lossgen.double_word import DoubleWordWriter, constant, plan_double_word
from lossgen.spec import load_spec

from conftest import ROW_PATHS

U = 2.0 ** -53


def _module():
    return lossgen.get("ssim_global").module


def _double_words(rng, n, spread=60):
    """n random double-words (hi, lo), |lo| <= ulp(hi)/2, hi over 2**+-spread, both signs."""
    hi = rng.standard_normal(n) * 2.0 ** rng.integers(-spread, spread, n)
    lo = hi * U * rng.uniform(-1, 1, n)
    lo = (hi + lo) - hi  # the rest as a float beside hi: hi + lo is normalised
    return hi, np.where(np.abs(lo) <= np.abs(np.spacing(hi)) / 2, lo, 0.0)


@pytest.mark.parametrize("operation, bound", [("_dw_add", 3), ("_dw_mul", 4), ("_dw_div", 15)])
def test_double_word_operations_are_within_their_bounds(operation, bound):
    """Each helper's result against the exact operation on the operands (mpmath at 60 digits),
    relative error within its bound times u**2 (Joldes, Muller and Popescu 2017), on random
    operands over a wide range of magnitudes, both signs, and sums that cancel."""
    function = getattr(_module(), operation)
    exact = {"_dw_add": lambda a, b: a + b, "_dw_mul": lambda a, b: a * b, "_dw_div": lambda a, b: a / b}[operation]
    rng = np.random.default_rng(3)
    ah, al = _double_words(rng, 400)
    bh, bl = _double_words(rng, 400)
    if operation == "_dw_add":  # a's that nearly cancel b's: b = -a (1 + small)
        bh[:100], bl[:100] = -ah[:100] * (1 + rng.uniform(-1e-9, 1e-9, 100)), -al[:100]
    worst = 0.0
    with mpmath.workdps(60):
        for a_h, a_l, b_h, b_l in zip(ah, al, bh, bl):
            hi, lo = function(a_h, a_l, b_h, b_l)
            truth = exact(mpmath.mpf(a_h) + mpmath.mpf(a_l), mpmath.mpf(b_h) + mpmath.mpf(b_l))
            if truth == 0:
                assert hi + lo == 0
                continue
            worst = max(worst, float(abs((mpmath.mpf(hi) + mpmath.mpf(lo) - truth) / truth)))
            assert abs(lo) <= abs(np.spacing(hi)) / 2 + 1e-300, (hi, lo)  # normalised
    assert worst <= bound * U * U, worst


def test_the_writer_evaluates_expressions_to_double_word_precision():
    """The writer's lines for a rational function with a Piecewise, run as Python (the helpers
    from a generated module), against mpmath: 1/3 and 1/10 as double-words of their own, the
    branch by the sign of the condition's double-word difference (a - b = 1e-20 where a and b
    round to the same float), and (a - b)**3 / (c + 1/3) where a - b cancels."""
    a, b, c = sp.symbols("a b c", real=True)
    expr = sp.Piecewise(((a - b) ** 3 / (c + sp.Rational(1, 3)), a - b > 0), (sp.Rational(1, 10) * c, True))
    writer = DoubleWordWriter({a: ("a_h", "a_l"), b: ("b_h", "b_l"), c: ("c_h", "c_l")}, "_d")
    hi, lo = writer.value(expr)
    module = _module()
    scope = {"_dw_add": module._dw_add, "_dw_mul": module._dw_mul, "_dw_div": module._dw_div}
    values = {"a_h": 0.75, "a_l": 1e-20, "b_h": 0.75, "b_l": 0.0, "c_h": 2.0, "c_l": 0.0}
    namespace = {**scope, **values}
    exec("\n".join(writer.lines + [f"result = ({hi}, {lo})"]), namespace)  # noqa: S102 (the test's own code)
    with mpmath.workdps(60):
        got = mpmath.mpf(namespace["result"][0]) + mpmath.mpf(namespace["result"][1])
        truth = mpmath.mpf(values["a_l"]) ** 3 / (2 + mpmath.mpf(1) / 3)
        assert abs((got - truth) / truth) < 1e-30
    assert constant(sp.Rational(1, 3)) == (repr(1 / 3), repr(float(sp.Rational(1, 3) - sp.Rational(1 / 3))))


def test_double_word_plans_by_form():
    """A block is planned where it has several outer products of arithmetic alone: a single
    product is never planned (it cannot cancel), nor a form with a function the writer lacks.
    (Of the catalog, global SSIM's block alone: tests/test_rows.py,
    test_exact_fallback_applies_by_form.)"""
    x, y = sp.symbols("x y", real=True)
    assert plan_double_word(((x, y),), [], frozenset(), {x, y}) is None
    assert plan_double_word(((x, y), (sp.exp(x), y)), [], frozenset(), {x, y}) is None
    assert plan_double_word(((x, y), (sp.sqrt(x), y)), [], frozenset(), {x, y}) is None
    assert plan_double_word(((x, y), (x ** 2 / (1 + y), y)), [], frozenset(), {x, y}) is not None


def _ssim_entry_terms(x, y, j, l, c1, c2):
    """The terms of global SSIM's Hessian entry (j, l), j != l, of 1 - f g, f = N1/A (luminance),
    g = N2/B (contrast-structure), by the quotient rule written out by hand (independent of the
    generator): -(f_jl g + f_j g_l + f_l g_j + f g_jl), each product of quotient-rule terms apart,
    in mpmath."""
    n = len(x)
    mx, my = mpmath.fsum(x) / n, mpmath.fsum(y) / n
    sxx = mpmath.fsum((p - mx) ** 2 for p in x) / n
    syy = mpmath.fsum((q - my) ** 2 for q in y) / n
    sxy = mpmath.fsum((p - mx) * (q - my) for p, q in zip(x, y)) / n
    n1, a_ = 2 * mx * my + c1, mx ** 2 + my ** 2 + c1
    n2, b_ = 2 * sxy + c2, sxx + syy + c2
    # first and second derivatives along x_j, x_l (j != l)
    dn1, da, dda = 2 * my / n, 2 * mx / n, mpmath.mpf(2) / n ** 2
    dn2 = {k: 2 * (y[k] - my) / n for k in (j, l)}
    db = {k: 2 * (x[k] - mx) / n for k in (j, l)}
    ddb = -mpmath.mpf(2) / n ** 2

    def first(num, den, dnum, dden):
        return [dnum / den, -num * dden / den ** 2]

    f_j = f_l = first(n1, a_, dn1, da)
    f_jl = [-dn1 * da / a_ ** 2, -dn1 * da / a_ ** 2, -n1 * dda / a_ ** 2, 2 * n1 * da * da / a_ ** 3]
    g_j, g_l = first(n2, b_, dn2[j], db[j]), first(n2, b_, dn2[l], db[l])
    g_jl = [-dn2[j] * db[l] / b_ ** 2, -dn2[l] * db[j] / b_ ** 2, -n2 * ddb / b_ ** 2, 2 * n2 * db[j] * db[l] / b_ ** 3]
    terms = [-t * n2 / b_ for t in f_jl] + [-t * n1 / a_ for t in g_jl]
    terms += [-s * t for s in f_j for t in g_l] + [-s * t for s in f_l for t in g_j]
    return terms


def _crossing(x, y, j, l, k, c1, c2):
    """y_k in [0, 1] (a float) where entry (j, l) of the closed form crosses zero, by bisection
    in mpmath; None where it keeps its sign over [0, 1]."""
    def entry(t):
        ys = [mpmath.mpf(float(v)) for v in y]
        ys[k] = t
        return mpmath.fsum(_ssim_entry_terms([mpmath.mpf(float(v)) for v in x], ys, j, l, c1, c2))
    lo, hi = mpmath.mpf(0), mpmath.mpf(1)
    if entry(lo) * entry(hi) > 0:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entry(lo) * entry(mid) > 0 else (lo, mid)
    return float(lo)


def test_ssim_global_entries_near_their_zero_crossings():
    """The full Hessian against the closed form above (mpmath, 50 digits) on uniform rows at
    C = 7: every off-diagonal entry of the first 20 rows (the closed form agrees with the
    kernels where nothing cancels), and entries at their zero crossings, a target element moved
    to the float where the entry changes sign (its terms cancel below 2**-30 of their size, where
    the kernels' floats kept no digit; off the crossings, relative errors up to 4.5e-10 on uniform
    rows at C = 7 and 16 before the double-word recomputation), each within 1e-12."""
    rng = np.random.default_rng(20261204)
    size = 7
    y, x = rng.random((40, size)), rng.random((40, size))
    c1, c2 = mpmath.mpf(1e-4), mpmath.mpf(9e-4)
    points = [(i, j, l) for i in range(20) for j in range(size) for l in range(size) if j != l]
    crossings = []
    with mpmath.workdps(50):
        for i in range(20, 40):  # entry (0, 1) crossing zero along y_2
            at = _crossing(x[i], y[i], 0, 1, 2, c1, c2)
            if at is not None:
                y[i, 2] = at
                crossings.append(i)
                points += [(i, 0, 1), (i, 1, 0)]
        hessian = lossgen.get("ssim_global").hess(y, x, full=True)
        for i, j, l in points:
            terms = _ssim_entry_terms([mpmath.mpf(float(v)) for v in x[i]], [mpmath.mpf(float(v)) for v in y[i]],
                                      j, l, c1, c2)
            truth = mpmath.fsum(terms)
            assert abs((hessian[i, j, l] - truth) / truth) <= 1e-12, (i, j, l, hessian[i, j, l], truth)
            if i in crossings:
                assert sum(abs(t) for t in terms) > 2 ** 30 * abs(truth), (i, j, l)
    assert len(crossings) >= 4, crossings
