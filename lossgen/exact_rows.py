"""A guarded exact fallback per row, for outputs that are quotients over row sums.

An element output of a row-wise loss whose terms holding reductions are rational in the row's
sums (reductions ``sum`` of polynomial summands), the element's inputs and the parameters, with a
denominator of row values alone (Dice's, Jaccard's and Tversky's gradients and Hessian
diagonals, what the quotient rule and ``gradient_share`` in :mod:`lossgen.fuse_rows` produce:
N(k)/D^2, N(k)/D^3), is

    Q(k) + rest(k),  Q(k) = num(k)/den

where num(k) is a polynomial whose terms can cancel far below their size (Tversky's at beta = 0,
y = (1/2, 1e-300), p = (1 - 2^-53, 1): terms of 1 summing to 1e-300). Written by the element's
monomials e_m, num(k) = sum_m A_m e_m(k) with row-level coefficients A_m (polynomials in the row
sums and the parameters). The kernels keep their vectorised pass and, per element, also compute
num(k) from the rounded A_m and B(k) = sum_m |A|_m |e_m(k)|, |A|_m the sum of the magnitudes of
A_m's terms (both hoisted per row: two multiply-adds per element; factors of num in the
element's inputs alone left out), OR-ing |num(k)| < t B(k), or t B(k) below 2^-960, into a row
flag (no branch in the loop). Only in a row with the flag set, after that pass, a function of
its own (not inlined, so that the row function stays as small as it was) recomputes the
elements whose test fires: each reduction a non-overlapping expansion of its summand's
monomials over the row (products of the row's input floats, the parameters and integers), every
A_m a product of its factors' expansions, every product split exactly by fused multiply-adds
(two-product) and every sum exact (Shewchuk's growing expansion, as Python's math.fsum), so
num(k) is rounded once; the denominator's row-level factors likewise, each rounded once, and
num divided by each. Each expansion carries a binary scale (its value is 2^s times the sum of
its parts; products are taken from the mantissas), so inputs at 1e-300 keep the error parts of
their products; a sum is exact to 2^-1022 of its largest term. The A_m read the row sums of
single monomials (:func:`monomial_sums`), so that reductions that cancel each other (a union U
and U - I) cancel in the algebra, not in expansions rounded at 2^-1022 of U. Where that value is
not finite (an overflowing product, a zero denominator) the fast value stays.

A Hessian block's off-diagonal entry (j, l), sum_m P_m(j) Q_m(l), is planned the same way over
the elements j and l (:func:`plan_block`); the kernels test it as outer products of per-element
factors (and where its bound over the denominator is tiny: each factor is divided by it; and
where the entry and the test's numerator over the denominator disagree, :func:`disagrees`: a
factor of the value below the normal range where the test's are not), every
block of the full Hessian (two predictions' four), and the Hessian-vector product per row of its
row of blocks; a flagged row of the product is recomputed as the full Hessian's row (its row
function, lossgen/emit_rows.py) times the directions.

The denominator's factors may be square roots of row polynomials (a cosine's |x|^5 |y|), each
rounded once and its root taken in the binary scale. Piecewises whose conditions are row values
(a norm below eps, cos >= margin) split the rows into regions (:func:`row_regions`), each branch
planned on its own (:class:`RegionPlans`); the recomputation decides a row's region exactly (each
comparison the sign of an expression in the row sums, :func:`_sign_form`). A row sum whose
summand may be negative enters the bound as the sum of its summands' magnitudes
(:func:`magnitude_sums`).

The rule is a table (:data:`EXACT_FALLBACK`): which outputs it applies to and the threshold. An
output qualifies by its form alone; no loss is named.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import sympy as sp
from sympy.core.relational import Relational

from .domains import nonnegative_on
from .vocabulary import exact_sum, finite_or, group, softmax_tie

# Which outputs get the fallback, and its test: |num| < threshold * B. Where the test does not
# hold the fast form's error is a few units in the last place of B, so at most 2^12 k 1.1e-16
# relative (k the roundings of the form, a handful). Tversky's gradient at 2e6 random elements
# (C = 10): every error beyond 1e-12 of the fast form was at |num|/B < 2^-13.3, and the test fires
# on 0.16% of the rows (2^-10: 0.53%).
EXACT_FALLBACK = {
    "quantities": ("grad", "hess", "hess_full"),
    "threshold": 2.0 ** -12,
    # and where the bound itself is this small: the fast form's roundings are then absolute
    # (subnormal, 2^-1074 each), not relative (Dice's gradient at y = (1e-300, 1e-16),
    # p = (1e-16, 1e-300), smooth = 0 is 1e-268 from a numerator of -4e-332, 0 in floats)
    "smallest_bound": 2.0 ** -960,
    "reduction_kinds": ("sum",),
}

# The recomputation's first try (:func:`emit_fallback`: gradients, Hessian diagonals): the row sums by
# Sum2 (two floats each, hi + lo, within E = 2 g**2 sum |t| + g 2**-1018 of the sum, g = gamma_2n,
# see :func:`_sum2_lines`), read as expansions by the exact algebra, each coefficient A_m and
# denominator factor with the bound of its error (:func:`_error_bound`), and each region's
# decision (the sign of a polynomial in the sums) likewise; a value or a sign is taken where its
# bound is below 2**-57 of it and it is above 2**-900, else the row is recomputed from
# exact sums. The kernels' test fires where |num(k)| < 2**-12 B(k); the first try holds down to
# about 2**-30 B at C = 1024. Dice's gradient on uniform soft targets at 2000 x 1024, where the
# test fires on 31% of the rows (one element each): 7 us a flagged row, 100 us from exact sums.
FIRST_TRY = {"gamma": 1.125 * 2.0 ** -53, "subnormal": 2.0 ** -1018, "relative": 2.0 ** -57,
             "smallest": 2.0 ** -900}

# the length of every scratch expansion: a non-overlapping expansion of doubles (every product is
# grown into one as it is formed) has at most about 2100/53 = 40 parts
EXPANSION = 64
# an expansion's count and scale as the generated code starts them: typed integers, not 0 and 1,
# since Numba compiles a function once for each literal value a call passes (Literal[int](0)):
# _xgrow_s had up to seven compilations a module
INT_ZERO, INT_ONE = "np.int64(0)", "np.int64(1)"


@dataclass(frozen=True)
class Fallback:
    """One output's plan: Q(k) = numerator/denominator (derivation's forms), the rest printed
    from the stable output, the reductions the exact evaluation expands."""

    tests: tuple                       # ((e_m's factors, A_m as one value, threshold * |A|_m), ...)
    groups: tuple                      # ((e_m's factors, A_m's terms ((int, (factor, ...), (reduction, ...)), ...)), ...)
    denominator: tuple                 # ((base, exponent), ...): numbers, symbols, row polynomials
    rest: sp.Expr                      # the stable output's terms without reductions
    reductions: dict                   # reduction symbol -> ((coefficient, factors), ...) its summand's monomials
    # the row sums of single monomials that ``groups`` read (:func:`monomial_sums`): symbol ->
    # ((1, factors),); and each reduction of several monomials as their sum (the recomputation
    # takes its expansion from theirs; the tests and denominators read the reductions)
    sums: dict = field(default_factory=dict)
    in_sums: dict = field(default_factory=dict)
    # the bound's sums of magnitudes: symbol -> sum_k |summand| of a reduction whose summand
    # may be negative (see :func:`magnitude_sums`)
    magnitudes: dict = field(default_factory=dict)
    # is the test's numerator the whole numerator (no factor in the element's inputs alone left
    # out, :func:`_without_element_factors`)? Then it over the denominator estimates the output
    whole: bool = True

    @property
    def denominator_value(self) -> sp.Expr:
        """The product of the denominator's factors."""
        return sp.Mul(*[b**e for b, e in self.denominator])

    @property
    def numerator(self) -> sp.Expr:
        """sum_m A_m e_m, the kernels' rounded numerator (the test's left side)."""
        return sp.Add(*[a * sp.Mul(*element) for element, a, _ in self.tests])

    @property
    def bound(self) -> sp.Expr:
        """threshold * sum_m |A|_m |e_m|, |A|_m the sum of the magnitudes of A_m's terms."""
        return sp.Add(*[magnitude * sp.Abs(sp.Mul(*element)) for element, _, magnitude in self.tests])


def _error_of(r: sp.Symbol) -> sp.Symbol:
    """The first try's bound of the error of row sum ``r``."""
    return sp.Symbol(f"_xE{r.name}", nonnegative=True)


def _magnitude_of(r: sp.Symbol) -> sp.Symbol:
    """The first try's sum of the magnitudes of row sum ``r``'s terms."""
    return sp.Symbol(f"_xM{r.name}", nonnegative=True)


def _error_bound(expr: sp.Expr, sums) -> sp.Expr:
    """A bound of |expr(S') - expr(S)| for ``expr`` a polynomial in the row sums ``sums`` (its
    other symbols exact), each S' within E of S and |S| <= M: per monomial c prod_i S_i,
    |c| sum_i E_i prod_{k != i} (M_k + E_k) (the product's telescoping sum), |c| at most the
    sum of the magnitudes of c's terms."""
    generators = sorted(expr.free_symbols & set(sums), key=sp.default_sort_key)
    if not generators:
        return sp.S.Zero
    total = []
    for powers, coefficient in sp.Poly(sp.expand(expr), *generators).terms():
        factors = [g for g, k in zip(generators, powers) for _ in range(k)]
        spread = sp.Add(*[_error_of(f) * sp.Mul(*[_magnitude_of(g) + _error_of(g) for g in factors[:i] + factors[i + 1:]])
                          for i, f in enumerate(factors)])
        # |c| as the sum of its terms' magnitudes: a rounded |2 a**2 + 2 a b - 2 a| is 0 near a + b = 1
        total.append(sp.Add(*[sp.Abs(t) for t in sp.Add.make_args(sp.expand(coefficient))]) * spread)
    return sp.Add(*total)


def _accepts(value: str, bound: str) -> str:
    """Code of the first try's acceptance of ``value`` with error at most ``bound``
    (:data:`FIRST_TRY`); false where either is not finite."""
    return (f"({bound}) * {1 / FIRST_TRY['relative']!r} < abs({value}) "
            f"and abs({value}) > {FIRST_TRY['smallest']!r}")


def at_l(symbol: sp.Symbol) -> sp.Symbol:
    """The symbol of element l of a row, where an expression's own element is j."""
    return sp.Symbol(f"_at_l_{symbol.name}", **symbol.assumptions0)


@dataclass(frozen=True)
class RegionPlans:
    """One output's plans per region of its row-level Piecewise branches (a norm replaced by eps
    below eps, a hinge's kink on a row value): ((condition, Fallback or None), ...) in the
    Piecewise's order (the first condition that holds picks the region). An output without such
    a Piecewise has one region, its condition True."""

    regions: tuple

    @property
    def numerator(self) -> sp.Expr:
        """The kernels' rounded numerator: per element monomial, its coefficient in the row's
        region (0 where the region's plan has none)."""
        return _by_region(self.regions, lambda f: {e: a for e, a, _ in f.tests}, sp.S.Zero)

    @property
    def bound(self) -> sp.Expr:
        """The test's bound, likewise; nan in a region without a plan: no comparison holds."""
        return _by_region(self.regions, lambda f: {e: m for e, _, m in f.tests}, sp.nan, absolute=True)


def _by_region(regions, coefficients, missing, absolute: bool = False) -> sp.Expr:
    """sum_m c_m(region) e_m over the element monomials e_m of the planned regions, each
    coefficient Piecewise over the regions (a row value): ``coefficients(plan)`` -> {e_m: c_m},
    0 where a plan lacks e_m, ``missing`` in a region without a plan."""
    tables = [(condition, None if f is None else coefficients(f)) for condition, f in regions]
    elements = list(dict.fromkeys(e for _, t in tables if t for e in t))
    return sp.Add(*[_over_regions(tables, lambda t, e=element: t.get(e, sp.S.Zero), missing)
                    * (sp.Abs(sp.Mul(*element)) if absolute else sp.Mul(*element)) for element in elements])


def _over_regions(regions, value, missing) -> sp.Expr:
    """``value(plan)`` in the row's region, one row value: the plan's own where there is one
    region, else Piecewise over ``regions`` ((condition, plan or None), ...), ``missing`` where
    a region has no plan."""
    if len(regions) == 1 and regions[0][1] is not None:
        return value(regions[0][1])
    return sp.Piecewise(*[(missing if f is None else value(f), condition) for condition, f in regions])


@dataclass(frozen=True)
class PairFallback:
    """The off-diagonal entries (j, l) of a Hessian block, sum_m P_m(j) Q_m(l), as one
    :class:`Fallback` over the elements j and l (element l's symbols renamed by :func:`at_l`)
    per region (``regions``: ((condition, Fallback or None), ...), those of the block's diagonal)."""

    regions: tuple
    copies: dict                       # element symbol -> its at_l copy

    def test_outer(self, per_entry: bool = False) -> tuple[list, list]:
        """The entry's test as outer products of element expressions: the numerator
        sum_m (A_m e_m(j)) f_m(l) and the bound sum_m (t |A|_m |e_m(j)|) |f_m(l)|, each a list
        of (P(j), Q(l)) in the row's own symbols, one per distinct f(l), P(j) Piecewise over the
        regions where there are several (the bound's nan in a region without a plan).
        ``per_entry``: the bound divided by the denominator, in the units of the entry itself."""
        back = {c: s for s, c in self.copies.items()}

        def outer(f: Fallback) -> dict:  # f(l) -> (sum A_m e_m(j), sum t |A|_m |e_m(j)|)
            by_other: dict = {}
            for element, a, magnitude in f.tests:
                own = sp.Mul(*[x for x in element if x not in back])
                other = sp.Mul(*[back[x] for x in element if x in back])
                terms = by_other.setdefault(other, ([], []))
                terms[0].append(a * own)
                terms[1].append(magnitude * sp.Abs(own))
            scale = 1 / sp.Abs(f.denominator_value) if per_entry else 1
            return {q: (sp.Add(*n), scale * sp.Add(*b)) for q, (n, b) in by_other.items()}

        tables = [(condition, None if f is None else outer(f)) for condition, f in self.regions]
        others = list(dict.fromkeys(q for _, t in tables if t for q in t))

        def part(q, side: int, missing):
            return _over_regions(tables, lambda t: t[q][side] if q in t else sp.S.Zero, missing)
        numerator = [(part(q, 0, sp.S.Zero), q) for q in others]
        bound = [(part(q, 1, sp.nan), sp.Abs(q)) for q in others]
        return numerator, bound

    def entry_scale(self) -> sp.Expr:
        """1/|denominator| in the row's region (nan where it has no plan): the bound in the units
        of the entry is the bound times it."""
        return _over_regions(self.regions, lambda f: 1 / sp.Abs(f.denominator_value), sp.nan)

    def estimate_scale(self) -> sp.Expr:
        """1/denominator in the row's region where the test's numerator is the whole numerator
        (nan elsewhere): the test's numerator times it estimates the entry (:func:`disagrees`)."""
        return _over_regions(self.regions, lambda f: 1 / f.denominator_value if f.whole else sp.nan, sp.nan)


def row_regions(exprs, element_symbols) -> tuple | None:
    """((condition, [expr's branch, ...]), ...): ``exprs`` with their Piecewises whose
    conditions are row values (free of the element symbols) folded into one, in the order of
    its conditions; one region, its condition True, where there are none; None where a
    condition varies along the row."""
    exprs = list(exprs)
    pieces = set().union(*(e.atoms(sp.Piecewise) for e in exprs))
    if not pieces:
        return ((sp.true, exprs),)
    if any(c.free_symbols & set(element_symbols) for p in pieces for _, c in p.args):
        return None
    markers = sp.symbols(f"_region_0:{len(exprs)}")
    folded = sp.piecewise_fold(sp.Add(*[m * e for m, e in zip(markers, exprs)]))
    if not isinstance(folded, sp.Piecewise):
        return None
    regions = tuple((condition, [branch.diff(m) for m in markers]) for branch, condition in folded.args)
    if any(b.has(sp.Piecewise) for _, branches in regions for b in branches):
        return None
    return regions


# the stable forms' functions that are identities in exact arithmetic: their exact value
EXACT_VALUE = {group: lambda a: a, finite_or: lambda a, b: a, exact_sum: lambda *a: sp.Add(*a),
               softmax_tie: lambda d, size, c, helper: d}


def in_exact_arithmetic(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the stable forms' wrappers (:data:`EXACT_VALUE`) replaced by their value."""
    def value(e):
        return next(f for kind, f in EXACT_VALUE.items() if isinstance(e, kind))(*e.args)
    return expr.replace(lambda e: isinstance(e, tuple(EXACT_VALUE)), value)


def monomials(expr: sp.Expr, generators: list) -> tuple | None:
    """expr as ((integer coefficient, factors), ...), or None where it is not a polynomial with
    integer coefficients in ``generators``."""
    try:
        poly = sp.Poly(sp.expand(expr), *generators)
    except sp.PolynomialError:
        return None
    if not poly.free_symbols <= set(generators):
        return None
    out = []
    for powers, coefficient in poly.terms():
        if not (coefficient.is_Integer and abs(int(coefficient)) < 2 ** 53):
            return None
        factors = tuple(g for g, e in zip(generators, powers) for _ in range(e))
        out.append((int(coefficient), factors))
    return tuple(out)


def _without_element_factors(numerator: sp.Expr, element_set) -> sp.Expr:
    """``numerator`` less its factors in the element's inputs alone (Jaccard's Hessian diagonal
    is (1 - y) times a polynomial in y and the row sums): the kernels compute such a factor
    apart, accurately, so the test's bound is that of the rest (in the monomials of
    (1 - y) (a y + b), B is large next to y = 1 where the value is small and accurate)."""
    content, factors = sp.factor_list(numerator)
    rest = [f**k for f, k in factors if not (f.free_symbols and f.free_symbols <= element_set)]
    return content * sp.Mul(*rest) if len(rest) < len(factors) else numerator


def _polynomial_sums(expr: sp.Expr, reductions: dict, element_symbols, parameters) -> bool:
    """Are the reductions ``expr`` reads sums of polynomials in the element and the parameters
    (the form's first condition, checked before the costly folding of its Piecewises: global
    SSIM's sums hold the means)?"""
    generators = sorted(set(element_symbols) | set(parameters), key=sp.default_sort_key)
    used = [reductions[s] for s in expr.free_symbols if s in reductions]
    return all(r.kind in EXACT_FALLBACK["reduction_kinds"] and monomials(r.summand, generators) is not None
               for r in used)


def plan(original: sp.Expr, stable: sp.Expr, reductions: dict, element_symbols, parameters,
         ranges: dict | None = None) -> RegionPlans | None:
    """The fallback of one output (``original`` as derived, ``stable`` as the kernels compute it),
    or None where the output does not have the form (see the module docstring) in any region of
    its row-level Piecewises (:func:`row_regions`). ``ranges``: the inputs' domains
    ({symbol: (low, high)}, see :func:`magnitude_sums`)."""
    if not _polynomial_sums(original, reductions, element_symbols, parameters):
        return None
    regions = _decided_regions([original], element_symbols, reductions)
    if regions is None:
        return None
    if len(regions) == 1:
        f = _plan_region(original, stable, reductions, element_symbols, parameters, None, ranges)
        return None if f is None else RegionPlans(((sp.true, f),))
    plans = tuple((condition, _plan_region(branch, branch, reductions, element_symbols, parameters,
                                           _conditions_of(regions), ranges))
                  for condition, (branch,) in regions)
    return RegionPlans(plans) if any(f is not None for _, f in plans) else None


def plan_block(diagonal: sp.Expr, stable_diagonal: sp.Expr, outer, stable_outer, reductions: dict,
               element_symbols, parameters, ranges: dict | None = None) -> tuple[RegionPlans, PairFallback] | None:
    """The fallback of one block of the Hessian (a prediction's own, or between two): its diagonal
    (as :func:`plan`; between two predictions their cross derivative at the same element) and its
    off-diagonal entries sum_m P_m(j) Q_m(l) (``outer``: the derivation's ((P, Q), ...)) as one
    :class:`Fallback` over the elements j and l, in the same regions; None where neither has the
    form (the diagonal and the entries both, where there are no row-level Piecewises)."""
    if not _polynomial_sums(diagonal, reductions, element_symbols, parameters):
        return None
    copies = {s: at_l(s) for s in sorted(element_symbols, key=sp.default_sort_key)}
    entry = sp.Add(*[p * q.xreplace(copies) for p, q in outer])
    pair_symbols = set(copies) | set(copies.values())
    regions = _decided_regions([diagonal, entry], element_symbols, reductions)
    if regions is None:
        return None
    if len(regions) == 1:
        own = _plan_region(diagonal, stable_diagonal, reductions, element_symbols, parameters, None, ranges)
        pair = _plan_region(entry, entry, reductions, pair_symbols, parameters, None, ranges)
        if own is None or pair is None or pair.rest != 0:
            return None
        return RegionPlans(((sp.true, own),)), PairFallback(((sp.true, pair),), copies)
    conditions = _conditions_of(regions)
    own = tuple((c, _plan_region(d, d, reductions, element_symbols, parameters, conditions, ranges))
                for c, (d, _) in regions)
    pair = tuple((c, _plan_region(e, e, reductions, pair_symbols, parameters, conditions, ranges))
                 for c, (_, e) in regions)
    if all(f is None for _, f in own + pair):
        return None
    return RegionPlans(own), PairFallback(pair, copies)


def _decided_regions(originals, element_symbols, reduction_symbols) -> tuple | None:
    """:func:`row_regions` of the derivation's ``originals``, where the recomputation can decide
    each condition on the row sums exactly (:func:`_sign_form`): it then writes the branch of the
    truth, whichever the kernels took (cosine_embedding's decide cos >= margin near cos = 1 by
    the Cauchy-Schwarz gap; the derivation's x1.x2/(|x1| |x2|) from rounded sums put x1 = x2 =
    1000, margin = 1 on the other side, and a recomputation there had relative error 4.5e286)."""
    regions = row_regions(originals, element_symbols)
    if regions is None or len(regions) == 1:
        return regions
    relations = _row_relations(_conditions_of(regions), reduction_symbols)
    return regions if all(_sign_form(r.lhs - r.rhs) is not None for r in relations) else None


def _row_relations(conditions: sp.Expr, reduction_symbols) -> list:
    """The comparisons of ``conditions`` that read row sums (the others, of inputs and
    parameters, are exact in floats as they stand)."""
    return sorted((r for r in conditions.atoms(Relational) if r.free_symbols & set(reduction_symbols)),
                  key=sp.default_sort_key)


def _sign_form(d: sp.Expr) -> tuple | None:
    """d = (a + b sqrt(q))/D as (a, b, q, bases): a, b, q polynomials, ``bases`` the
    polynomial factors of D of odd power (its roots are positive), so that
    sign(d) = sign(a + b sqrt(q)) prod sign(base); None where d has no such form."""
    numerator, denominator = sp.fraction(sp.together(d))
    bases = []
    for base, exponent in (f.as_base_exp() for f in sp.Mul.make_args(denominator)):
        if not (exponent.is_Rational and exponent > 0 and exponent.q in (1, 2)):
            return None
        if exponent.q == 1 and exponent.p % 2 == 1 and base.is_Number:
            numerator = numerator * sp.sign(base)
        elif exponent.q == 1 and exponent.p % 2 == 1:
            bases.append(base)
    roots = sorted({p for p in numerator.atoms(sp.Pow) if p.exp == sp.S.Half}, key=sp.default_sort_key)
    if any(p.exp.is_Rational and not p.exp.is_Integer for p in numerator.atoms(sp.Pow) if p not in roots):
        return None
    placeholders = sp.symbols(f"_root0:{len(roots)}")
    numerator = sp.expand(numerator.xreplace(dict(zip(roots, placeholders))))
    try:
        poly = sp.Poly(numerator, *placeholders) if roots else None
    except sp.PolynomialError:
        return None
    if poly is None:
        a, b, q = numerator, sp.S.Zero, sp.S.Zero
    else:
        terms = dict(poly.terms())
        if not set(terms) <= {(0,) * len(roots), (1,) * len(roots)}:
            return None
        a, b = terms.get((0,) * len(roots), sp.S.Zero), terms.get((1,) * len(roots), sp.S.Zero)
        q = sp.Mul(*(r.base for r in roots))
    for e in (a, b, q, *bases):  # polynomials with rational coefficients (exact as expansions)
        if e.is_Number:
            if not e.is_Rational:
                return None
            continue
        try:
            if not all(c.is_Rational for c in sp.Poly(e, *sorted(e.free_symbols, key=sp.default_sort_key)).coeffs()):
                return None
        except sp.PolynomialError:
            return None
    return a, b, q, tuple(bases)


def _conditions_of(regions) -> sp.Expr:
    """The regions' conditions as one row value (their reductions are the recomputation's too)."""
    return sp.Piecewise(*[(sp.Integer(r), c) for r, (c, _) in enumerate(regions)])


def monomial_sums(summands: dict) -> tuple[dict, dict]:
    """The row sums of the monomials of the reductions' summands ``summands`` ({reduction:
    ((coefficient, factors), ...)}), one symbol each: ({symbol: ((1, factors),)}, {reduction:
    sum_m c_m S_m}). A reduction that is the sum of one monomial is its own. The exact
    recomputation reads the coefficients A_m in these, so that sums that cancel between
    reductions cancel in the algebra: Jaccard's U - (U - I) is I, exact, where expansions of U
    and U - I each lose the parts below 2^-1022 of their size (its Hessian's numerator at
    y = (1e-300, 1e-16), p = (1e-16, 1e-300), 4e-600 from terms of 4e-316, needs U to 1e-584 of
    its size; I = sum(p y) holds its own parts)."""
    own = {terms[0][1]: r for r, terms in summands.items() if len(terms) == 1 and terms[0][0] == 1}
    sums, in_sums = {r: terms for r, terms in summands.items() if r in own.values()}, {}
    for r, terms in summands.items():
        if r in own.values():
            continue
        total = []
        for c, factors in terms:
            if factors not in own:
                name = "_m_" + "_".join(re.sub(r"\W", "", f.name) for f in factors) if factors else "_m_1"
                own[factors] = sp.Symbol(name)
                sums[own[factors]] = ((1, factors),)
            total.append(c * own[factors])
        in_sums[r] = sp.Add(*total)
    return sums, in_sums


def _plan_region(original: sp.Expr, stable: sp.Expr, reductions: dict, element_symbols, parameters,
                 conditions: sp.Expr | None = None, ranges: dict | None = None) -> Fallback | None:
    """One region's plan. With ``conditions`` (the row's regions, :func:`_conditions_of`) the
    output is a branch of its Piecewises, evaluated as derived: every term must hold a reduction
    (no rest), and the conditions' reductions are expanded as well."""
    reduction_symbols = set(reductions)
    quotient = [t for t in sp.Add.make_args(original) if t.free_symbols & reduction_symbols]
    rest = [t for t in sp.Add.make_args(stable) if not t.free_symbols & reduction_symbols]
    if not quotient:
        return None
    # the rest is printed from the stable output: it must be the derivation's rest
    original_rest = sp.Add(*[t for t in sp.Add.make_args(original) if not t.free_symbols & reduction_symbols])
    if sp.Add(*rest) != original_rest and sp.simplify(in_exact_arithmetic(sp.Add(*rest)) - original_rest) != 0:
        return None
    if conditions is not None and rest:
        return None
    used = set().union(*(t.free_symbols for t in quotient)) & reduction_symbols
    used |= (conditions.free_symbols if conditions is not None else set()) & reduction_symbols
    if any(reductions[r].kind not in EXACT_FALLBACK["reduction_kinds"] for r in used):
        return None
    parts = [sp.fraction(t) for t in quotient]
    if len({d for _, d in parts}) == 1:
        numerator, denominator = sp.Add(*[n for n, _ in parts]), parts[0][1]
    if len({d for _, d in parts}) != 1 or not sp.together(numerator).is_polynomial():
        # quotients over different denominators, or nested in the numerator (Jaccard's Hessian)
        numerator, denominator = sp.fraction(sp.together(sp.Add(*quotient)))
    element_set = set(element_symbols)
    if denominator.free_symbols & element_set:
        return None
    if not numerator.free_symbols & reduction_symbols:
        return None  # a numerator of the element alone (a norm's gradient): the elementwise forms' part
    elements = sorted(element_set, key=sp.default_sort_key)
    others = sorted(parameters, key=sp.default_sort_key)
    summands = {}
    for r in sorted(used, key=sp.default_sort_key):
        summands[r] = monomials(reductions[r].summand, elements + others)
        if summands[r] is None:
            return None
    rows = sorted(used, key=sp.default_sort_key)
    free = sorted(numerator.free_symbols - element_set - set(parameters) - set(rows), key=sp.default_sort_key)
    generators = elements + others + free + rows
    numerator_terms = monomials(numerator, generators)
    if numerator_terms is None:
        return None
    if conditions is not None and numerator_terms[0][0] < 0:
        # a branch's sign in its denominator, so that branches that differ in sign alone (1 - cos
        # and cos - margin) share their numerator's code (:func:`_numerator_groups`)
        numerator, denominator = -numerator, -denominator
    # grouped by the element's monomial e_m: A_m is a row value, computed once per row (exactly
    # in the fallback, from the monomials' sums; rounded in the kernels' test, from the reductions)
    sums, in_sums = monomial_sums(summands)
    groups: dict = {}
    in_monomial_sums = elements + others + free + sorted(sums, key=sp.default_sort_key)
    for c, fs in monomials(numerator.xreplace(in_sums), in_monomial_sums):
        element = tuple(f for f in fs if f in element_set)
        groups.setdefault(element, []).append((c, tuple(f for f in fs if f not in element_set and f not in sums),
                                               tuple(f for f in fs if f in sums)))
    # the test: by the element's monomials and the row sums, each coefficient a polynomial in the
    # parameters as one factored value (combo's (1 - alpha)(2 I + smooth), not 2 I + smooth less
    # alpha (2 I + smooth) apart: the magnitudes of those terms would add to (1 + alpha)(...))
    atoms = [g for g in generators if g not in set(parameters)]
    tested = _without_element_factors(numerator, element_set)
    poly = sp.Poly(sp.expand(tested), *atoms)
    by_element: dict = {}
    for powers, coefficient in poly.terms():
        factors = [g for g, n in zip(atoms, powers) for _ in range(n)]
        element = tuple(f for f in factors if f in element_set)
        row = sp.Mul(*[f for f in factors if f not in element_set])
        by_element.setdefault(element, []).append((sp.factor(poly.rep.dom.to_sympy(coefficient)), row))
    # each row coefficient one value (group), the threshold (a power of two) in its bound, whose
    # row sums are the sums of their terms' magnitudes
    magnitudes = magnitude_sums({r: reductions[r] for r in rows}, ranges or {})
    tests = tuple((element, group(sp.Add(*[c * r for c, r in terms])),
                   group(sp.Float(EXACT_FALLBACK["threshold"])
                         * sp.Add(*[sp.Abs(c) * sp.Abs(r.xreplace(magnitudes)) for c, r in terms])))
                  for element, terms in by_element.items())
    factors = []
    for base, exponent in (b.as_base_exp() for b in sp.Mul.make_args(denominator)):
        # integer powers, and those of square roots (a norm's)
        if not (exponent.is_Rational and exponent > 0 and exponent.q in (1, 2)):
            return None
        if not (base.is_Number or base.is_Symbol) and monomials(base, generators) is None:
            return None
        factors.append((base, exponent))
    return Fallback(tests=tests, groups=tuple((element, tuple(terms)) for element, terms in groups.items()),
                    denominator=tuple(factors), rest=sp.Add(*rest), reductions=summands, sums=sums, in_sums=in_sums,
                    magnitudes={m: sp.Abs(reductions[r].summand) for r, m in magnitudes.items()},
                    whole=tested == numerator)


def magnitude_sums(reductions: dict, ranges: dict) -> dict:
    """{reduction symbol: the symbol of sum_k |summand(k)|} for the reductions whose summand may
    be negative where the inputs are in ``ranges`` ({symbol: (low, high)}): the test's |A|_m then
    takes the magnitudes of the row's terms, not of their sum. The kernels' sums are compensated,
    but each summand is rounded before it is added (x_k y_k), so a sum that cancels between
    elements keeps only the digits of its terms: x.y is -3.1e-7 at x = (-1, -1e10 (1 + 2^-52),
    1 + 2^-52, 1e-8, -1e10), y = (1e-300, -1, -1e10, 1e-300, -1e-300), where the rounded products
    sum to 1e-290 (cosine_proximity's gradient and Hessian had relative error 1 there)."""
    return {r: sp.Symbol(f"{r.name}_abs", nonnegative=True) for r, reduction in reductions.items()
            if not nonnegative_on(reduction.summand, ranges)}


# --- emission: lines of a row kernel ---------------------------------------------------------

def fires(numerator: str, bound: str, entry_bound: str = "") -> str:
    """Code of the test (a bool, no branch): |numerator| < bound, or the bound is tiny, or the
    ``entry_bound`` (the bound over the denominator, where the kernels divide each outer-product
    factor by it: a factor below the normal range has lost digits) is."""
    tiny = repr(EXACT_FALLBACK['smallest_bound'])
    return f"(abs({numerator}) < {bound}) | ({bound} < {tiny})" + (f" | ({entry_bound} < {tiny})" if entry_bound else "")


# Where the test does not fire, the entry and the test's estimate of it (its numerator over the
# denominator) are each within about 2^12 k u of the truth; they differ by more than this only
# where a value lost digits that the test's form kept: an outer-product factor of the value below
# the normal range (cosine_embedding at x1 = (1e50, -700), x2 = (0, 1e-300): entry (1, 0) of x2's
# block, 1e-282, was 0 from a factor of 1e-332, where the test's numerator held 1e-262)
ESTIMATE_AGREES = 2.0 ** -40


def disagrees(value: str, estimate: str) -> str:
    """Code of the test (a bool) that ``value`` differs from ``estimate`` by more than
    ESTIMATE_AGREES of it (false where the estimate is nan: no plan, or not the whole numerator)."""
    return f"(abs({value} - {estimate}) > {ESTIMATE_AGREES!r} * abs({estimate}))"


def product_lines(coefficient: int, factors, rows, printed, target: str) -> list[str]:
    """Lines adding coefficient * prod(factors) * prod(rows' expansions) to the scaled
    expansion ``target`` (its length ``target``_n, its scale ``target``_s), exactly. A product
    of at most two floats is split inline (the product of their mantissas and, by a fused
    multiply-add, its error); longer ones in _xt."""
    # a power of two 2**k as the product's scale (exact, and no overflow), else as a factor
    magnitude = abs(int(coefficient))
    shift = magnitude.bit_length() - 1 if magnitude & (magnitude - 1) == 0 else None
    floats = ([] if shift is not None else [repr(float(magnitude))]) + [printed(f) for f in factors]
    scale = f" + {shift}" if shift else ""
    sign = "-" if coefficient < 0 else ""
    grow = f"{target}_n, {target}_s = _xgrow_s({target}, {target}_n, {target}_s, {{}}, {{}})"
    if not rows and len(floats) <= 2:
        if len(floats) == 0:
            return [grow.format(f"{sign}1.0", shift)]
        if len(floats) == 1:
            return [grow.format(f"{sign}{floats[0]}", shift)]
        a, b = floats
        return [f"_xh, _xl, _xe = _xtwo_product({a}, {b})", grow.format(f"{sign}_xh", f"_xe{scale}"),
                grow.format(f"{sign}_xl", f"_xe{scale}")]
    if not floats and len(rows) == 1 and coefficient > 0:  # 2**k R: R's parts in a scale k higher
        r = rows[0].name
        return [f"{target}_n, {target}_s = _xgrow_all_s({target}, {target}_n, {target}_s, _x{r}, _x{r}_n, _x{r}_s{scale})"]
    if shift:
        floats.insert(0, repr(float(magnitude)))
    lines = [f"_xt[0] = {sign}1.0", f"_xm = {INT_ONE}", f"_xt_s = {INT_ZERO}"]
    for f in floats:
        lines.append(f"_xm, _xt_s = _xmul_s(_xt, _xm, _xt_s, {f}, _xu)")
    for r in rows:
        lines.append(f"_xm, _xt_s = _xmulx_s(_xt, _xm, _xt_s, _x{r.name}, _x{r.name}_n, _x{r.name}_s, _xu)")
    lines.append(f"{target}_n, {target}_s = _xgrow_all_s({target}, {target}_n, {target}_s, _xt, _xm, _xt_s)")
    return lines


def _emit_setup(body, plans: dict, printed, denominators: dict | None = None, first_try: bool = False):
    """Lines of the row-level part of the recomputation: the scratch expansions (rows of one
    buffer), every reduction an expansion over the row (and the sums of magnitudes of the
    tests' bounds), and the values of the kernels' tests. Each plan's own part
    (:func:`_emit_plan_setup`) waits for the first element that needs it; ``denominators``: the
    plans whose denominators are computed apart (:func:`_split`). With ``first_try``
    (:data:`FIRST_TRY`) the row sums are Sum2's where _xexact is false, each with its error
    bound _xE and magnitude _xM, and each coefficient A_m with the bound of its error. Returns
    ({reduction: sum of monomial sums} of the reductions built from the sums, {sum summed over
    the row: its monomials})."""
    reductions, sums, derived = {}, {}, {}
    for p in plans.values():
        reductions.update(p.reductions)
        sums.update({s: t for s, t in p.sums.items() if s not in p.reductions})
        derived.update(p.in_sums)
    every = {**reductions, **sums}
    looped = {r: terms for r, terms in every.items() if r not in derived}  # summed over the row
    names = ["_xt", "_xu", "_xa", "_xf", "_xp"] + [f"_x{r.name}" for r in every]
    names += [f"_xA{j}_{m}" for j, p in plans.items() for m in range(len(p.groups))]
    body.emit(2, f"_xbuffer = np.empty(({len(names)}, {EXPANSION}))")
    for row, name in enumerate(names):
        body.emit(2, f"{name} = _xbuffer[{row}]")
    for r in every:
        body.emit(2, f"_x{r.name}_n = {INT_ZERO}")
        body.emit(2, f"_x{r.name}_s = {INT_ZERO}")
    magnitudes = {}
    for p in plans.values():
        magnitudes.update(p.magnitudes)
    for m in magnitudes:
        body.emit(2, f"{printed(m)} = 0.0")

    def emit_loop(indent: int, term_lines):
        body.emit(indent, "for _k in range(_n):")
        body.bind([sp.Mul(*f) for terms in looped.values() for _, f in terms] + list(magnitudes.values()), indent + 1)
        for m, summand in magnitudes.items():
            body.emit(indent + 1, f"{printed(m)} += {printed(summand)}")
        for r, terms in looped.items():
            for coefficient, factors in terms:
                for line in term_lines(r, coefficient, factors):
                    body.emit(indent + 1, line)

    def exact_terms(r, coefficient, factors):
        return product_lines(coefficient, factors, (), printed, f"_x{r.name}")

    if not first_try:
        emit_loop(2, exact_terms)
    else:
        body.emit(2, "if _xexact:")
        emit_loop(3, exact_terms)
        for r in looped:
            body.emit(3, f"{printed(_error_of(r))} = 0.0")
            body.emit(3, f"{printed(_magnitude_of(r))} = 0.0")
        body.emit(2, "else:")
        accumulators = {r: (f"_xsh{r.name}", f"_xsl{r.name}", f"_xsm{r.name}") for r in looped}
        for r in looped:
            for name in accumulators[r]:
                body.emit(3, f"{name} = 0.0")
        emit_loop(3, lambda r, coefficient, factors: _sum2_lines(coefficient, factors, printed, accumulators[r]))
        # Sum2 of 2n parts (each product split): |S - (hi + lo)| <= g**2 sum |t|, g = gamma_2n,
        # twice for the products of more factors; and 2**-1074 per part where a product's
        # error is subnormal
        body.emit(3, f"_xg = {FIRST_TRY['gamma']!r} * (2.0 * _n + 2.0)")
        for r in looped:
            hi, lo, size = accumulators[r]
            for part in (hi, lo):
                body.emit(3, f"_x{r.name}_n, _x{r.name}_s = _xgrow_s(_x{r.name}, _x{r.name}_n, _x{r.name}_s, {part}, {INT_ZERO})")
            body.emit(3, f"{printed(_error_of(r))} = 2.0 * _xg * _xg * {size} + _xg * {FIRST_TRY['subnormal']!r}")
            body.emit(3, f"{printed(_magnitude_of(r))} = {size}")
    for r in looped:
        body.emit(2, f"_x{r.name}_n = _xcompress(_x{r.name}, _x{r.name}_n, _xu)")
        body.emit(2, f"_x{r.name}_s = _xnormalize(_x{r.name}, _x{r.name}_n, _x{r.name}_s)")
    # a reduction of several monomials from their sums, exactly (one pass over the row fewer)
    for r, total in derived.items():
        for line in _sum_lines(monomials(total, sorted(total.free_symbols, key=sp.default_sort_key)), every,
                               printed, f"_x{r.name}"):
            body.emit(2, line)
        body.emit(2, f"_x{r.name}_n = _xcompress(_x{r.name}, _x{r.name}_n, _xu)")
        body.emit(2, f"_x{r.name}_s = _xnormalize(_x{r.name}, _x{r.name}_n, _x{r.name}_s)")
    # the kernels' test again, on the row sums rounded from their expansions
    for r in reductions:
        body.emit(2, f"{printed(r)} = _xvalue_s(_x{r.name}, _x{r.name}_n, _x{r.name}_s)")
    for j, p in plans.items():
        body.emit(2, f"_xready{j} = False")
        for d in range(len(p.denominator)):
            body.emit(2, f"_xd{j}_{d} = 1.0")
            body.emit(2, f"_xd{j}_{d}_s = {INT_ZERO}")
        for m in range(len(p.groups)):
            body.emit(2, f"_xA{j}_{m}_n = {INT_ZERO}")
            body.emit(2, f"_xA{j}_{m}_s = {INT_ZERO}")
        for m, (_, a, magnitude) in enumerate(p.tests):
            body.emit(2, f"_xc{j}_{m} = {printed(a)}")
            body.emit(2, f"_xb{j}_{m} = {printed(magnitude)}")
        if first_try:
            body.emit(2, f"_xdok{j} = True")
            for m, (_, terms) in enumerate(p.groups):
                expr = sp.Add(*[c * sp.Mul(*fs) * sp.Mul(*rows) for c, fs, rows in terms])
                body.emit(2, f"_xdA{j}_{m} = {printed(_error_bound(expr, p.sums))}")
    # the regions that share a numerator: their denominators, each computed once per row apart
    for j, p in (denominators or {}).items():
        body.emit(2, f"_xdready{j} = False")
        if j in plans:
            continue
        if first_try:
            body.emit(2, f"_xdok{j} = True")
        for d in range(len(p.denominator)):
            body.emit(2, f"_xd{j}_{d} = 1.0")
            body.emit(2, f"_xd{j}_{d}_s = {INT_ZERO}")
    return derived, looped


def _emit_plan_setup(body, j, p: Fallback, printed, indent: int, parts=("denominator", "numerator"),
                     flag: str = "_xready", first_try: bool = False):
    """Lines of plan ``j``'s row-level values, once per row (``flag``{j}): its denominator's
    factors (each rounded once, and a root's of it after: b**(n/2) is the root of b to the power
    n) and its coefficients A_m (expansions, each a product of its factors' sums: Dice's
    2 D (D - E) from two sums, not from its nine expanded monomials); ``parts``: which."""
    body.emit(indent, f"if not {flag}{j}:")
    body.emit(indent + 1, f"{flag}{j} = True")
    if "denominator" in parts:
        _emit_denominator_setup(body, j, p, printed, indent + 1, first_try)
    if "numerator" in parts:
        _emit_numerator_setup(body, j, p, printed, indent + 1)


def _emit_denominator_setup(body, j, p: Fallback, printed, indent: int, first_try: bool = False):
    """Lines setting _xd{j}_{d}, _xd{j}_{d}_s: each factor of plan ``j``'s denominator; with
    ``first_try``, _xdok{j} false where a factor from the first try's sums may be off by more
    than :data:`FIRST_TRY` accepts (a root's relative error is half its square's)."""
    for d, (base, exponent) in enumerate(p.denominator):
        if base.is_Number:
            body.emit(indent, f"_xd{j}_{d} = {float(sp.sqrt(base) if exponent.q == 2 else base)!r}")
            continue
        body.emit(indent, f"_xa_n = {INT_ZERO}")
        body.emit(indent, f"_xa_s = {INT_ZERO}")
        for line in _sum_lines(_base_terms(base), p.reductions, printed, "_xa"):
            body.emit(indent, line)
        body.emit(indent, f"_xd{j}_{d}, _xd{j}_{d}_s = _xvalue_m(_xa, _xa_n, _xa_s)")
        if first_try:
            bound = _error_bound(base.xreplace(p.in_sums), p.sums)
            if bound != 0:
                body.emit(indent, f"_xdok{j} = _xdok{j} and {_accepts(f'math.ldexp(_xd{j}_{d}, _xd{j}_{d}_s)', printed(bound))}")
        if p.denominator[d][1].q == 2:
            body.emit(indent, f"_xd{j}_{d}, _xd{j}_{d}_s = _xsqrt_m(_xd{j}_{d}, _xd{j}_{d}_s)")


def _emit_numerator_setup(body, j, p: Fallback, printed, indent: int):
    """Lines setting the expansions _xA{j}_{m}: each coefficient A_m of plan ``j``."""
    for m, (_, terms) in enumerate(p.groups):
        target = f"_xA{j}_{m}"
        content, factors = _factored(terms)
        if len(factors) == 1 and factors[0][1] == 1:
            body.emit(indent, f"{target}_n = {INT_ZERO}")
            body.emit(indent, f"{target}_s = {INT_ZERO}")
            monomials = [(content * c, fs) for c, fs in factors[0][0]]
            for line in _sum_lines(monomials, p.sums, printed, target):
                body.emit(indent, line)
        else:
            body.emit(indent, f"_xp[0] = {float(content)!r}")
            body.emit(indent, f"_xp_n = {INT_ONE}")
            body.emit(indent, f"_xp_s = {INT_ZERO}")
            for monomials, multiplicity in factors:
                body.emit(indent, f"_xf_n = {INT_ZERO}")
                body.emit(indent, f"_xf_s = {INT_ZERO}")
                for line in _sum_lines(monomials, p.sums, printed, "_xf"):
                    body.emit(indent, line)
                body.emit(indent, "_xf_n = _xcompress(_xf, _xf_n, _xu)")
                body.emit(indent, "_xf_s = _xnormalize(_xf, _xf_n, _xf_s)")
                for _ in range(multiplicity):
                    body.emit(indent, "_xp_n, _xp_s = _xmulx_s(_xp, _xp_n, _xp_s, _xf, _xf_n, _xf_s, _xu)")
            body.emit(indent, f"{target}_n = _xcopy({target}, _xp, _xp_n)")
            body.emit(indent, f"{target}_s = _xp_s")
        body.emit(indent, f"{target}_n = _xcompress({target}, {target}_n, _xu)")
        body.emit(indent, f"{target}_s = _xnormalize({target}, {target}_n, {target}_s)")


def _sum_lines(monomials, reductions, printed, target: str) -> list[str]:
    """Lines adding the monomials ((int, factors), ...) to the expansion ``target``, exactly."""
    lines = []
    for coefficient, factors in monomials:
        rows = tuple(f for f in factors if f in reductions)
        lines += product_lines(coefficient, [f for f in factors if f not in reductions], rows, printed, target)
    return lines


def _factored(terms) -> tuple:
    """A_m's terms ((int, factors, reductions), ...) as (integer content, ((its factors'
    monomials, multiplicity), ...)) over the integers (sympy.factor_list)."""
    expr = sp.Add(*[c * sp.Mul(*fs) * sp.Mul(*rows) for c, fs, rows in terms])
    content, factors = sp.factor_list(expr)
    parts = [(_base_terms(f), k) for f, k in factors]
    if not (content.is_Integer and abs(int(content)) < 2 ** 53) or any(m is None for m, _ in parts) or not parts:
        return 1, (([(c, fs + rows) for c, fs, rows in terms], 1),)
    return int(content), tuple(parts)


def _emit_test(body, j, p: Fallback, printed, indent: int):
    """Lines setting _xn and _xb to the kernels' test of plan ``j`` at the bound element,
    |num| < threshold * B, from the row's values of :func:`_emit_setup`. They may differ from
    the kernels' by a few roundings, so an element is recomputed where |_xn| < 2 _xb: every
    element the kernels flagged, and a few more."""
    products = [printed(sp.Mul(*element)) if element else "" for element, _, _ in p.tests]
    body.emit(indent, "_xn = " + " + ".join(f"_xc{j}_{m}*{e}" if e else f"_xc{j}_{m}" for m, e in enumerate(products)))
    body.emit(indent, "_xb = " + " + ".join(f"_xb{j}_{m}*abs({e})" if e else f"_xb{j}_{m}"
                                            for m, e in enumerate(products)))


def _emit_value(body, j, p: Fallback, printed, indent: int, denominators=None, first_try: bool = False):
    """Lines setting _xq to plan ``j``'s output at the bound element: sum_m A_m e_m as one
    expansion, rounded once, divided by the denominator's factors, plus the rest.
    ``denominators``: ((region variable's test, key, plan), ...) of regions that share this
    numerator and differ in their denominators (a norm or eps), one of which holds. With
    ``first_try``, the function returns False where _xexact is false and the value from the
    first try's sums may be off by more than :data:`FIRST_TRY` accepts."""
    if denominators is None:
        _emit_plan_setup(body, j, p, printed, indent, first_try=first_try)
    else:
        _emit_plan_setup(body, j, p, printed, indent, parts=("numerator",))
    body.emit(indent, f"_xa_n = {INT_ZERO}")
    body.emit(indent, f"_xa_s = {INT_ZERO}")
    for m, (element, _) in enumerate(p.groups):
        body.emit(indent, f"_xm = _xcopy(_xt, _xA{j}_{m}, _xA{j}_{m}_n)")
        body.emit(indent, f"_xt_s = _xA{j}_{m}_s")
        for f in element:
            body.emit(indent, f"_xm, _xt_s = _xmul_s(_xt, _xm, _xt_s, {printed(f)}, _xu)")
        body.emit(indent, "_xa_n, _xa_s = _xgrow_all_s(_xa, _xa_n, _xa_s, _xt, _xm, _xt_s)")
    # mantissas divided, the scales apart: the numerator and the denominator may both be
    # far below the normal range where their quotient is not
    body.emit(indent, "_xq, _xq_s = _xvalue_m(_xa, _xa_n, _xa_s)")
    if first_try:
        bound = " + ".join(f"_xdA{j}_{m}*abs({printed(sp.Mul(*element))})" if element else f"_xdA{j}_{m}"
                           for m, (element, _) in enumerate(p.groups))
        body.emit(indent, f"if not (_xexact or (_xdok{j} and {_accepts('math.ldexp(_xq, _xq_s)', bound)})):")
        body.emit(indent + 1, "return False")
    if denominators is None:
        _emit_division(body, j, p, indent)
    else:
        for n, (test, key, plan_) in enumerate(denominators):
            body.emit(indent, f"{'if' if n == 0 else 'elif'} {test}:")
            _emit_plan_setup(body, key, plan_, printed, indent + 1, parts=("denominator",), flag="_xdready",
                             first_try=first_try)
            if first_try:
                body.emit(indent + 1, f"if not (_xexact or _xdok{key}):")
                body.emit(indent + 2, "return False")
            _emit_division(body, key, plan_, indent + 1)
    body.emit(indent, "_xq = math.ldexp(_xq, _xq_s)")
    if p.rest != 0:
        (rest,) = body.cse([p.rest], indent)
        body.emit(indent, f"_xq = _xq + ({rest})")


def _emit_division(body, j, p: Fallback, indent: int):
    """Lines dividing (_xq, _xq_s) by plan ``j``'s denominator, factor by factor."""
    for d, (_, exponent) in enumerate(p.denominator):
        for _ in range(exponent.p):  # b**(n/2): the root divided n times
            body.emit(indent, f"_xq = _xq / _xd{j}_{d}")
            body.emit(indent, f"_xq_s -= _xd{j}_{d}_s")


def _same_numerator(f: Fallback, g: Fallback) -> bool:
    """Do two regions' plans differ in their denominators alone (a norm and eps)?"""
    return (f.tests, f.groups, f.rest, f.reductions, f.sums, f.magnitudes) == (g.tests, g.groups, g.rest, g.reductions,
                                                                                 g.sums, g.magnitudes)


def _numerator_groups(regions) -> list:
    """[[region, ...], ...]: the planned regions whose plans share a numerator (the first one's),
    each list in the regions' order."""
    groups: list = []
    for r, (_, f) in enumerate(regions):
        if f is None:
            continue
        for g in groups:
            if _same_numerator(regions[g[0]][1], f):
                g.append(r)
                break
        else:
            groups.append([r])
    return groups


def _region_keys(j, regions) -> dict:
    """{region: name} of the regions with a plan: ``j`` itself where there is one region."""
    if len(regions) == 1:
        return {0: j} if regions[0][1] is not None else {}
    return {r: f"{j}r{r}" for r, (_, f) in enumerate(regions) if f is not None}


def _emit_region(body, j, regions, reductions, printed, decided: dict, first_try=None):
    """Lines setting _xregion{j}, the row's region (the first of ``regions``' conditions that
    holds), each comparison of row sums decided exactly by the sign of its difference
    (:func:`_emit_sign`), once per row (``decided``: {comparison: its decision}, shared by the
    outputs); nothing where there is one region."""
    if len(regions) <= 1:
        return
    conditions = _conditions_of(regions)
    for relation in _row_relations(conditions, reductions):
        if relation not in decided:
            sign = sp.Symbol(f"_xcs{len(decided)}", real=True)
            _emit_sign(body, _sign_form(relation.lhs - relation.rhs), reductions, printed, sign.name, first_try)
            decided[relation] = relation.func(sign, 0)
    body.emit(2, f"_xregion{j} = {printed(conditions.xreplace(decided))}")


def _emit_polynomial_sign(body, p: sp.Expr, reductions, printed, name: str, first_try=None):
    """Lines setting ``name`` to the sign (-1.0, 0.0 or 1.0) of the polynomial ``p`` in the row
    sums (their expansions), the parameters and the row's values: p as one expansion, exactly.
    ``first_try``: :func:`_emit_setup`'s (reductions as sums of monomial sums, sums over the
    row) of a recomputation with a first try (:data:`FIRST_TRY`), which returns False where
    that sign is not certain from its sums."""
    p = sp.expand(p)
    if p.is_Number:
        body.emit(2, f"{name} = {float(sp.sign(p))!r}")
        return
    if (p.is_Symbol or (-p).is_Symbol) and not p.free_symbols & set(reductions):  # a parameter, an input
        body.emit(2, f"{name} = math.copysign(1.0, {printed(p)}) if {printed(p)} != 0.0 else 0.0")
        return
    generators = sorted(p.free_symbols, key=sp.default_sort_key)
    _, poly = sp.Poly(p, *generators).clear_denoms()  # a positive multiple, integer coefficients
    body.emit(2, f"_xa_n = {INT_ZERO}")
    body.emit(2, f"_xa_s = {INT_ZERO}")
    for powers, coefficient in poly.terms():
        factors = [g for g, k in zip(generators, powers) for _ in range(k)]
        rows = tuple(f for f in factors if f in reductions)
        for line in product_lines(int(coefficient), [f for f in factors if f not in reductions], rows, printed, "_xa"):
            body.emit(2, line)
    body.emit(2, "_xa_n = _xcompress(_xa, _xa_n, _xu)")
    body.emit(2, "_xv, _xv_s = _xvalue_m(_xa, _xa_n, _xa_s)")
    if first_try is not None:
        in_sums, sums = first_try
        bound = _error_bound(poly.as_expr().xreplace(in_sums), sums)
        if bound != 0:
            body.emit(2, f"if not (_xexact or {_accepts('math.ldexp(_xv, _xv_s)', printed(bound))}):")
            body.emit(3, "return False")
    body.emit(2, f"{name} = 1.0 if _xv > 0.0 else (-1.0 if _xv < 0.0 else 0.0)")


def _emit_sign(body, form: tuple, reductions, printed, name: str, first_try=None):
    """Lines setting ``name`` to the sign of (a + b sqrt(q))/D (:func:`_sign_form`): where a and
    b do not compete, their sign; else sign(a) sign(a**2 - b**2 q)."""
    a, b, q, bases = form
    _emit_polynomial_sign(body, a, reductions, printed, f"{name}_a", first_try)
    if b == 0:
        body.emit(2, f"{name} = {name}_a")
    else:
        _emit_polynomial_sign(body, b, reductions, printed, f"{name}_b", first_try)
        _emit_polynomial_sign(body, q, reductions, printed, f"{name}_q", first_try)
        _emit_polynomial_sign(body, a**2 - b**2 * q, reductions, printed, f"{name}_d", first_try)
        body.emit(2, f"if {name}_a * {name}_b >= 0.0:")
        body.emit(3, f"{name} = {name}_a if {name}_a != 0.0 else ({name}_b if {name}_q > 0.0 else 0.0)")
        body.emit(2, "else:")
        body.emit(3, f"{name} = {name}_a * {name}_d")
    for m, base in enumerate(bases):
        _emit_polynomial_sign(body, base, reductions, printed, f"{name}_{m}", first_try)
        body.emit(2, f"{name} = {name} * {name}_{m}")


def _split(j, regions) -> tuple[dict, dict]:
    """({key: plan} of the regions whose numerator :func:`_emit_value` computes, {key: plan} of
    those whose denominators it computes apart: every region of a group that shares a
    numerator)."""
    keys = _region_keys(j, regions)
    groups = _numerator_groups(regions)
    return ({keys[g[0]]: regions[g[0]][1] for g in groups},
            {keys[r]: regions[r][1] for g in groups if len(g) > 1 for r in g})


def _emit_regions(body, j, regions, indent: int, emit_plan, region: str = ""):
    """For each group of ``regions`` (of output ``j``) that share a numerator: a line opening it
    where there are several regions (``region``: the variable of :func:`_emit_region`, _xregion{j}
    unless given) and ``emit_plan(key, plan, denominators, indent)``."""
    keys = _region_keys(j, regions)
    region = region or f"_xregion{j}"
    for group in _numerator_groups(regions):
        inner = indent
        if len(regions) > 1:
            body.emit(indent, "if " + " or ".join(f"{region} == {r}" for r in group) + ":")
            inner = indent + 1
        denominators = None if len(group) == 1 else [(f"{region} == {r}", keys[r], regions[r][1]) for r in group]
        emit_plan(keys[group[0]], regions[group[0]][1], denominators, inner)


def emit_fallback(body, plans: dict, outs: dict):
    """The body of a row's exact recomputation (``body``: an emit_rows._Body of its own; the
    kernels call it where the row's flag is set). ``plans``: output index -> RegionPlans;
    ``outs``: index -> the output array's name. The elements whose test fires are recomputed, in
    the row's region; a value that is not finite (a zero denominator, an overflowing product)
    leaves the fast one. With _xexact false the function is the first try (:data:`FIRST_TRY`):
    it returns False where a region's decision or a value is not certain from Sum2's sums, and
    True where it wrote every value."""
    printed = lambda e: body.printer.doprint(body.rename(e))
    body.bind_row()
    flat, denominators = {}, {}
    for j, p in plans.items():
        numerators, others = _split(j, p.regions)
        flat.update(numerators)
        denominators.update(others)
    sums = _emit_setup(body, flat, printed, denominators, first_try=True)
    reductions, decided = {r: t for f in flat.values() for r, t in f.reductions.items()}, {}
    for j, p in plans.items():
        _emit_region(body, j, p.regions, reductions, printed, decided, sums)
    body.emit(2, "for _k in range(_n):")
    body.bind([sp.Mul(*e) for f in flat.values() for e, _ in f.groups] + [f.rest for f in flat.values()], 3)
    for j, p in plans.items():
        def emit_plan(key, f, shared, indent, out=outs[j]):
            _emit_test(body, key, f, printed, indent)
            body.emit(indent, f"if {fires('_xn', '2.0 * _xb')}:")
            _emit_value(body, key, f, printed, indent + 1, shared, first_try=True)
            body.emit(indent + 1, "if math.isfinite(_xq):")
            body.emit(indent + 2, f"{out}[_i, _k] = _w * _xq")
        _emit_regions(body, j, p.regions, 3, emit_plan)
    body.emit(2, "return True")


class BlockRecompute(NamedTuple):
    """One block's part of a row's recomputation of its Hessian (:func:`emit_block_fallback`)."""
    diagonal: RegionPlans
    pair: PairFallback
    out: str                        # the output array
    flags: int                      # the kernel's scratch row of the rows k to recompute


def emit_block_fallback(body, blocks: list[BlockRecompute]):
    """The body of a row's exact recomputation of its Hessian, block by block: entry (k, k) by
    the diagonal's plans, (k, l) by the pair's, in the row's region, where the entry's test
    fires, in the rows k of the block that the kernel flagged, written to the block's ``out`` at
    output row _o where finite. The row sums' expansions and the region's decisions are set up
    once for every block (the Hessian-vector product's recomputation calls the full Hessian's
    row function: lossgen/emit_rows.py)."""
    printed = lambda e: body.printer.doprint(body.rename(e))
    body.bind_row()
    # the plans' keys: 2 b for block b's diagonal, 2 b + 1 for its other entries
    splits = [(_split(2 * b, block.diagonal.regions), _split(2 * b + 1, block.pair.regions))
              for b, block in enumerate(blocks)]
    flat = {key: f for (own, _), (other, _) in splits for key, f in {**own, **other}.items()}
    shared = {key: f for (_, own), (_, other) in splits for key, f in {**own, **other}.items()}
    _emit_setup(body, flat, printed, shared)
    reductions, decided = {r: t for f in flat.values() for r, t in f.reductions.items()}, {}
    for b, block in enumerate(blocks):
        _emit_region(body, b, block.diagonal.regions, reductions, printed, decided)
        body.emit(2, f"_xscale{b} = {printed(block.pair.entry_scale())}")
        body.emit(2, f"_xestimate{b} = {printed(block.pair.estimate_scale())}")
    # a loop over the flagged rows k of each block
    for b, block in enumerate(blocks):
        body.emit(2, "for _k in range(_n):")
        body.emit(3, f"if _scratch[{block.flags}, _k] == 0.0:")
        body.emit(4, "continue")
        _emit_block_row(body, b, block, splits[b], printed)


def _emit_block_row(body, b, block: BlockRecompute, split, printed):
    """Lines recomputing row k of block ``b`` (:func:`emit_block_fallback`), entry by entry."""
    diagonal, pair, out, _ = block
    (own, _), (other, _) = split
    region = f"_xregion{b}"
    body.bind([sp.Mul(*e) for f in own.values() for e, _ in f.groups] + [f.rest for f in own.values()], 3)
    body.emit(3, "for _l in range(_n):")
    used = set().union(*(set(e) for f in other.values() for e, _ in f.groups))
    for symbol, copy in pair.copies.items():
        if copy in used:
            at = "[_l]" if body.element[symbol].shared else "[_i, _l]"
            body.emit(4, f"{printed(copy)} = {symbol.name}{at}")

    def emit_plan(key, f, denominators, indent, entry_bound="", estimate=""):
        _emit_test(body, key, f, printed, indent)
        test = fires('_xn', '2.0 * _xb', entry_bound)
        if estimate:  # and where the kernel's value is not the test's estimate (:func:`disagrees`)
            test += " | " + disagrees(f"{out}[_o, _k, _l]", f"_w * _xn * {estimate}")
        body.emit(indent, f"if {test}:")
        _emit_value(body, key, f, printed, indent + 1, denominators)
        body.emit(indent + 1, "if math.isfinite(_xq):")
        body.emit(indent + 2, f"{out}[_o, _k, _l] = _w * _xq")

    # entry (k, k) by the diagonal's plans, the others by the pair's, each in the row's region
    body.emit(4, "if _l == _k:")
    if own:
        _emit_regions(body, 2 * b, diagonal.regions, 5, emit_plan, region)
    else:
        body.emit(5, "pass")
    body.emit(4, "else:")
    if other:
        _emit_regions(body, 2 * b + 1, pair.regions, 5,
                      lambda key, f, denominators, indent: emit_plan(key, f, denominators, indent,
                                                                      f"2.0 * _xb * _xscale{b}", f"_xestimate{b}"),
                      region)
    else:
        body.emit(5, "pass")


# An exact row sum's first try (:func:`emit_exact_sum`): the terms split exactly and summed with
# their errors apart (Ogita, Rump and Oishi's Sum2/Dot2), |R - sum| <= u |R| + (m u)**2 sum |t|
# for m parts; taken where that is below 2**-50 |R| and the values are away from under- and
# overflow, else the expansion (a row of 256 elements: 4 us against 160 us).
SUM2_ACCEPTS = {"relative": 2.0 ** -50, "smallest": 2.0 ** -900, "largest": 2.0 ** 900}


def _sum2_lines(coefficient: int, factors, printed, accumulator=("_sh", "_sl", "_sm")) -> list[str]:
    """Lines adding coefficient * prod(factors) to the Sum2 accumulator (hi, lo) and its
    magnitude to the third of ``accumulator``'s names: the product split by fused multiply-adds
    (each further factor's error of the low part rounded: second order), a power-of-two
    coefficient applied exactly after."""
    hi, lo, size = accumulator
    magnitude = abs(int(coefficient))
    power = magnitude & (magnitude - 1) == 0
    floats = ([] if power else [repr(float(magnitude))]) + [printed(f) for f in factors] or ["1.0"]
    lines = [f"_ph = {floats[0]}", "_pl = 0.0"] if len(floats) == 1 else split_product_lines(*floats[:2])
    for f in floats[2:]:
        lines += [f"_pq = _ph * {f}", f"_pl = _fma(_ph, {f}, -_pq) + _pl * {f}", "_ph = _pq"]
    if power and magnitude != 1:
        lines += [f"_ph = _ph * {float(magnitude)!r}", f"_pl = _pl * {float(magnitude)!r}"]
    return lines + add_split_lines(hi, lo, negative=coefficient < 0) + [f"{size} += abs(_ph)"]


def split_product_lines(a: str, b: str) -> list[str]:
    """Lines setting _ph + _pl = a*b exactly (a two-product by a fused multiply-add)."""
    return [f"_ph = {a} * {b}", f"_pl = _fma({a}, {b}, -_ph)"]


def add_split_lines(hi: str, lo: str, negative: bool = False) -> list[str]:
    """Lines adding (or with ``negative`` subtracting) _ph + _pl to the double-word (hi, lo):
    the high parts' sum exact (two-sum), its error and _pl into lo."""
    sign, op = ("-", "-") if negative else ("", "+")
    return [f"_x = {hi} {op} _ph", f"_z = _x - {hi}",
            f"{lo} += ({hi} - (_x - _z)) + ({sign}_ph - _z) {op} _pl", f"{hi} = _x"]


def emit_exact_sum(body, terms):
    """The body of a function returning the row sum of ``terms`` ((integer, factors), ...: a
    summand's :func:`monomials`) as a double-double (hi, lo) of its exact value: first by Sum2
    (:data:`SUM2_ACCEPTS`), else each term split exactly (a two-product, as
    :func:`product_lines`) and grown into one scaled expansion (``body``: an emit_rows._Body of
    its own)."""
    printed = lambda e: body.printer.doprint(body.rename(e))
    body.emit(2, "_sh = 0.0")
    body.emit(2, "_sl = 0.0")
    body.emit(2, "_sm = 0.0")
    body.emit(2, "for _k in range(_n):")
    body.bind([sp.Mul(*factors) for _, factors in terms], 3)
    for coefficient, factors in terms:
        for line in _sum2_lines(coefficient, factors, printed):
            body.emit(3, line)
    body.emit(2, "_hi = _sh + _sl")
    body.emit(2, f"_g = {len(terms)} * _n * 1.1102230246251565e-16")
    accepts = {k: repr(v) for k, v in SUM2_ACCEPTS.items()}
    body.emit(2, f"if abs(_hi) > {accepts['smallest']} and _sm < {accepts['largest']} "
                 f"and _g * _g * _sm <= {accepts['relative']} * abs(_hi):")
    body.emit(3, "return _hi, _sl - (_hi - _sh)")
    body.emit(2, f"_xbuffer = np.empty((3, {EXPANSION}))")
    for row, name in enumerate(("_xt", "_xu", "_xs")):
        body.emit(2, f"{name} = _xbuffer[{row}]")
    body.emit(2, f"_xs_n = {INT_ZERO}")
    body.emit(2, f"_xs_s = {INT_ZERO}")
    body.emit(2, "for _k in range(_n):")
    body.bind([sp.Mul(*factors) for _, factors in terms], 3)
    for coefficient, factors in terms:
        for line in product_lines(coefficient, factors, (), printed, "_xs"):
            body.emit(3, line)
    body.emit(2, "_hi = _xvalue_s(_xs, _xs_n, _xs_s)")
    body.emit(2, f"_xs_n, _xs_s = _xgrow_s(_xs, _xs_n, _xs_s, -_hi, {INT_ZERO})")
    body.emit(2, "return _hi, _xvalue_s(_xs, _xs_n, _xs_s)")


def _base_terms(base: sp.Expr):
    """A denominator factor's monomials (a polynomial in row sums, parameters and symbols)."""
    generators = sorted(base.free_symbols, key=sp.default_sort_key)
    return monomials(base, generators)
