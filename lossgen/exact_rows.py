"""A guarded exact fallback per row, for outputs that are quotients over row sums.

An element output of a row-wise loss whose terms holding reductions are rational in the row's
sums (reductions ``sum`` of polynomial summands), the element's inputs and the parameters, with a
denominator of row values alone (Dice's, Jaccard's and Tversky's gradients, what the quotient rule
and ``gradient_share`` in :mod:`lossgen.fuse_rows` produce: N(k)/D^2), is

    Q(k) + rest(k),  Q(k) = num(k)/den

where num(k) is a polynomial whose terms can cancel far below their size (Tversky's at beta = 0,
y = (1/2, 1e-300), p = (1 - 2^-53, 1): terms of 1 summing to 1e-300). Written by the element's
monomials e_m, num(k) = sum_m A_m e_m(k) with row-level coefficients A_m (polynomials in the row
sums and the parameters). The kernels keep their vectorised pass and, per element, also compute
num(k) from the rounded A_m and B(k) = sum_m |A|_m |e_m(k)|, |A|_m the sum of the magnitudes of
A_m's terms (both hoisted per row: two multiply-adds per element), OR-ing |num(k)| < t B(k) into
a row flag (no branch in the loop). Only in a row with the flag set, after that pass, a function
of its own (not inlined, so that the row function stays as small as it was) recomputes the
row's output: each reduction a non-overlapping expansion of its summand's monomials over the row
(products of the row's input floats, the parameters and integers), every A_m an expansion of its
terms, every product split exactly by fused multiply-adds (two-product) and every sum exact
(Shewchuk's growing expansion, as Python's math.fsum), so num(k) is rounded once; the
denominator's row-level factors likewise, each rounded once, and num divided by each. Where that
value is not finite (an overflowing product, a zero denominator) the fast value stays. Products
whose error part falls below the smallest normal (a row sum of 1e-316 times 1e-16) are not
exact: rows whose sum(p y) is subnormal keep the error of that underflow.

The rule is a table (:data:`EXACT_FALLBACK`): which outputs it applies to and the threshold. An
output qualifies by its form alone; no loss is named.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .vocabulary import group

# Which outputs get the fallback, and its test: |num| < threshold * B. Where the test does not
# hold the fast form's error is a few units in the last place of B, so at most 2^12 k 1.1e-16
# relative (k the roundings of the form, a handful). Tversky's gradient at 2e6 random elements
# (C = 10): every error beyond 1e-12 of the fast form was at |num|/B < 2^-13.3, and the test fires
# on 0.16% of the rows (2^-10: 0.53%).
EXACT_FALLBACK = {
    "quantities": ("grad",),
    "threshold": 2.0 ** -12,
    "reduction_kinds": ("sum",),
}

# the length of every scratch expansion: a non-overlapping expansion of doubles (every product is
# grown into one as it is formed) has at most about 2100/53 = 40 parts
EXPANSION = 64


@dataclass(frozen=True)
class Fallback:
    """One output's plan: Q(k) = numerator/denominator (derivation's forms), the rest printed
    from the stable output, the reductions the exact evaluation expands."""

    numerator: sp.Expr                 # sum_m A_m e_m: e_m a product of the element's inputs, A_m row-level
    bound: sp.Expr                     # threshold * sum_m |A|_m |e_m|, |A|_m the sum of the magnitudes of A_m's terms
    groups: tuple                      # ((e_m's factors, A_m's terms ((int, (factor, ...), (reduction, ...)), ...)), ...)
    denominator: tuple                 # ((base, exponent), ...): numbers, symbols, row polynomials
    rest: sp.Expr                      # the stable output's terms without reductions
    reductions: dict                   # reduction symbol -> ((coefficient, factors), ...) its summand's monomials


def _monomials(expr: sp.Expr, generators: list) -> tuple | None:
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


def plan(original: sp.Expr, stable: sp.Expr, reductions: dict, element_symbols, parameters) -> Fallback | None:
    """The fallback of one output (``original`` as derived, ``stable`` as the kernels compute it),
    or None where the output does not have the form (see the module docstring)."""
    reduction_symbols = set(reductions)
    quotient = [t for t in sp.Add.make_args(original) if t.free_symbols & reduction_symbols]
    rest = [t for t in sp.Add.make_args(stable) if not t.free_symbols & reduction_symbols]
    if not quotient:
        return None
    # the rest is printed from the stable output: it must be the derivation's rest
    original_rest = sp.Add(*[t for t in sp.Add.make_args(original) if not t.free_symbols & reduction_symbols])
    if sp.Add(*rest) != original_rest and sp.simplify(sp.Add(*rest) - original_rest) != 0:
        return None
    used = set().union(*(t.free_symbols for t in quotient)) & reduction_symbols
    if any(reductions[r].kind not in EXACT_FALLBACK["reduction_kinds"] for r in used):
        return None
    parts = [sp.fraction(t) for t in quotient]
    if len({d for _, d in parts}) == 1:
        numerator, denominator = sp.Add(*[n for n, _ in parts]), parts[0][1]
    else:
        numerator, denominator = sp.fraction(sp.together(sp.Add(*quotient)))
    element_set = set(element_symbols)
    if denominator.free_symbols & element_set:
        return None
    elements = sorted(element_set, key=sp.default_sort_key)
    others = sorted(parameters, key=sp.default_sort_key)
    summands = {}
    for r in sorted(used, key=sp.default_sort_key):
        summands[r] = _monomials(reductions[r].summand, elements + others)
        if summands[r] is None:
            return None
    rows = sorted(used, key=sp.default_sort_key)
    generators = elements + others + [s for s in sorted(numerator.free_symbols - element_set - set(parameters)
                                                          - set(rows), key=sp.default_sort_key)] + rows
    numerator_terms = _monomials(numerator, generators)
    if numerator_terms is None:
        return None
    # grouped by the element's monomial e_m: A_m is a row value, computed once per row (exactly
    # in the fallback, rounded in the kernels' test)
    groups: dict = {}
    for c, fs in numerator_terms:
        element = tuple(f for f in fs if f in element_set)
        groups.setdefault(element, []).append((c, tuple(f for f in fs if f not in element_set and f not in reduction_symbols),
                                               tuple(f for f in fs if f in reduction_symbols)))
    # the test: by the element's monomials and the row sums, each coefficient a polynomial in the
    # parameters as one factored value (combo's (1 - alpha)(2 I + smooth), not 2 I + smooth less
    # alpha (2 I + smooth) apart: the magnitudes of those terms would add to (1 + alpha)(...))
    atoms = [g for g in generators if g not in set(parameters)]
    poly = sp.Poly(sp.expand(numerator), *atoms)
    by_element: dict = {}
    for powers, coefficient in poly.terms():
        factors = [g for g, n in zip(atoms, powers) for _ in range(n)]
        element = tuple(f for f in factors if f in element_set)
        row = sp.Mul(*[f for f in factors if f not in element_set])
        by_element.setdefault(element, []).append((sp.factor(poly.rep.dom.to_sympy(coefficient)), row))
    test, bound = [], []
    for element, terms in by_element.items():
        # each row coefficient one value (group), the threshold (a power of two) in its bound
        test.append(group(sp.Add(*[c * r for c, r in terms])) * sp.Mul(*element))
        bound.append(group(sp.Float(EXACT_FALLBACK["threshold"]) * sp.Add(*[sp.Abs(c) * sp.Abs(r) for c, r in terms]))
                     * sp.Abs(sp.Mul(*element)))
    factors = []
    for base, exponent in (b.as_base_exp() for b in sp.Mul.make_args(denominator)):
        if not (exponent.is_Integer and exponent > 0):
            return None
        if not (base.is_Number or base.is_Symbol) and _monomials(base, generators) is None:
            return None
        factors.append((base, int(exponent)))
    return Fallback(numerator=sp.Add(*test), bound=sp.Add(*bound),
                    groups=tuple((element, tuple(terms)) for element, terms in groups.items()),
                    denominator=tuple(factors), rest=sp.Add(*rest), reductions=summands)


# --- emission: lines of a row kernel ---------------------------------------------------------

def product_lines(coefficient: int, factors, rows, printed, target: str) -> list[str]:
    """Lines adding coefficient * prod(factors) * prod(rows' expansions) to the expansion
    ``target`` (length ``target``_n), exactly. A product of at most two floats is split inline
    (its rounded value and, by a fused multiply-add, its error); longer ones in _xt."""
    floats = ([] if abs(coefficient) == 1 else [repr(float(abs(coefficient)))]) + [printed(f) for f in factors]
    sign = "-" if coefficient < 0 else ""
    grow = f"{target}_n = _xgrow({target}, {target}_n, {{}})"
    if not rows and len(floats) <= 2:
        if len(floats) == 0:
            return [grow.format(f"{sign}1.0")]
        if len(floats) == 1:
            return [grow.format(f"{sign}{floats[0]}")]
        a, b = floats
        return [f"_xh = {a}*{b}", f"_xl = _fma({a}, {b}, -_xh)",
                grow.format(f"{sign}_xh"), grow.format(f"{sign}_xl")]
    lines = [f"_xt[0] = {sign}1.0", "_xm = 1"]
    for f in floats:
        lines.append(f"_xm = _xmul(_xt, _xm, {f}, _xu)")
    for r in rows:
        lines.append(f"_xm = _xmulx(_xt, _xm, _x{r.name}, _x{r.name}_n, _xu)")
    lines.append(f"{target}_n = _xgrow_all({target}, {target}_n, _xt, _xm)")
    return lines


def emit_fallback(body, plans: dict, outs: dict):
    """The body of a row's exact recomputation (``body``: an emit_rows._Body of its own; the
    kernels call it where the row's flag is set). ``plans``: output index -> Fallback; ``outs``:
    index -> the output array's name. Every element of the row is recomputed; a value that is
    not finite (a zero denominator, an overflowing product) leaves the fast one."""
    printed = lambda e: body.printer.doprint(body.rename(e))
    body.bind_row()
    for name in ("_xt", "_xu", "_xa"):
        body.emit(2, f"{name} = np.empty({EXPANSION})")
    reductions = {}
    for p in plans.values():
        reductions.update(p.reductions)
    for r in reductions:
        body.emit(2, f"_x{r.name} = np.empty({EXPANSION})")
        body.emit(2, f"_x{r.name}_n = 0")
    body.emit(2, "for _k in range(_n):")
    body.bind([sp.Mul(*f) for terms in reductions.values() for _, f in terms], 3)
    for r, terms in reductions.items():
        for coefficient, factors in terms:
            for line in product_lines(coefficient, factors, (), printed, f"_x{r.name}"):
                body.emit(3, line)
    for j, p in plans.items():
        for d, (base, _) in enumerate(p.denominator):
            if base.is_Number:
                body.emit(2, f"_xd{j}_{d} = {float(base)!r}")
                continue
            body.emit(2, "_xa_n = 0")
            for coefficient, factors in _base_terms(base):
                rows = tuple(f for f in factors if f in reductions)
                for line in product_lines(coefficient, [f for f in factors if f not in reductions], rows, printed, "_xa"):
                    body.emit(2, line)
            body.emit(2, f"_xd{j}_{d} = _xvalue(_xa, _xa_n)")
        for m, (_, terms) in enumerate(p.groups):
            body.emit(2, f"_xA{j}_{m} = np.empty({EXPANSION})")
            body.emit(2, f"_xA{j}_{m}_n = 0")
            for coefficient, factors, rows in terms:
                for line in product_lines(coefficient, factors, rows, printed, f"_xA{j}_{m}"):
                    body.emit(2, line)
    body.emit(2, "for _k in range(_n):")
    body.bind([sp.Mul(*e) for p in plans.values() for e, _ in p.groups] + [p.rest for p in plans.values()], 3)
    for j, p in plans.items():
        body.emit(3, "_xa_n = 0")
        for m, (element, _) in enumerate(p.groups):
            body.emit(3, f"_xm = _xcopy(_xt, _xA{j}_{m}, _xA{j}_{m}_n)")
            for f in element:
                body.emit(3, f"_xm = _xmul(_xt, _xm, {printed(f)}, _xu)")
            body.emit(3, "_xa_n = _xgrow_all(_xa, _xa_n, _xt, _xm)")
        body.emit(3, "_xq = _xvalue(_xa, _xa_n)")
        for d, (_, exponent) in enumerate(p.denominator):
            for _ in range(exponent):
                body.emit(3, f"_xq = _xq / _xd{j}_{d}")
        if p.rest != 0:
            (rest,) = body.cse([p.rest], 3)
            body.emit(3, f"_xq = _xq + ({rest})")
        body.emit(3, "if math.isfinite(_xq):")
        body.emit(4, f"{outs[j]}[_i, _k] = _w * _xq")


def _base_terms(base: sp.Expr):
    """A denominator factor's monomials (a polynomial in row sums, parameters and symbols)."""
    generators = sorted(base.free_symbols, key=sp.default_sort_key)
    return _monomials(base, generators)
