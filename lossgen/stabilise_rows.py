"""Stage 3 for row-wise losses: the rules and splits of :mod:`lossgen.stabilise`, after two
rewrites that only rows need.

* **At the indexed element.** An element expression with onehot(y) is split into the element
  y itself and the others. At element y every take(g, y) is g of that element, so
  w_y onehot(y) - w_y softmax_y becomes w (1 - softmax), which the rules turn into
  -w expm1(log-softmax): the gradient of cross-entropy keeps its digits where the model is
  right. The same holds for max and min at their arg-max.
* **Log-weights.** For R = logsumexp(g) with g = a x + b, x is written as (u + R - b)/a, so
  exp(g - R) is exp(u) and exp(2 (g - R)) is exp(u)**2; the rules then see softmax
  (1 - softmax) as exp(u) (-expm1(u)). Afterwards u is g - R again (the emitter computes it
  as (g - max) - log1p(...), see :mod:`lossgen.emit_rows`). A summand that is not linear in
  one element (ArcFace's target logit) gets the same weights by pattern: exp(k (g - R)) is
  exp(k u), and a polynomial in exp(u) that vanishes at 1 becomes expm1(u) times a quotient.
* **Complement weights.** Where such an expression holds a real power (1 - exp(u))**g (the
  focal factor), it is written in Q = -expm1(u) for u > -log 2, so that the powers of Q combine
  exactly (Q**g/Q is Q**(g - 1), 0 at a saturated row rather than 0/0).
* **Singular takes.** A take t = take(h, y) whose complement form keeps a power of Q = 1 - p_y
  with an exponent that may be negative (the focal Hessian's Q**(gamma - 1)) is inf, or 0*inf at
  gamma = 0, where Q underflows, while t p_k is bounded at every other class k (p_k <= Q). In
  the branch k != y, t p_k is computed as take(h Q, y) pi_k, pi_k = exp(g_k - R') = p_k/Q the
  softmax over the other classes (R' a logsumexp over the row less y): both finite on every row.
* **Simplex weights.** This element's softmax weight E = p_k, the indexed class's F = p_y
  (k != y) and the rest of the row O = 1 - E - F lie on the simplex E + F + O = 1. A polynomial
  in E and F that vanishes at a vertex (E = 1: Poly-1's Hessian p_k ((1 - p_k)(w_y + eps p_y)
  - eps p_y p_k) where class k holds the row's mass) is written homogeneous in (E, F, O), so no
  constant is left to cancel, and O is the compensated sum of the row's weights less E and F:
  the other classes' weights, to working precision.
* **Outer products by factor.** The terms of a Hessian block's outer products that share a
  factor of l (the softmax p_l) are taken together, so their coefficient is one expression of j
  that the rewrites above see whole (the row kernels compute an entry (j, l) with l at the
  onehot index as entry (l, j) of the symmetric block).
* **Outer products in one another's basis.** Where a Q of a block's outer products is affine in
  another, Q_a = c Q_b + d, and Q_b is a factor of a P, the pair is (c P_a + P_b) Q_b + d P_a
  (:func:`_outer_affine`): soft Jaccard's entries in 1 - y_l, not in 1 and y_l apart.
* **A row total less an element term.** A row total T = R_1 + ... + c dividing an element
  expression, with a coefficient of the numerator (a polynomial in T) that has the factor
  T - k g(j): the numerator is divided by Z = T - k g, one exact sum (:func:`_total_less_own`):
  Dice's Hessian diagonal 2 (N Z + 4 p y T)/T**3, Z = T - 4 p**2.
* **Unit weights.** For a norm R = sqrt(S), S = sum(g**2) with g linear in an element x that
  no other reduction reads, x is written through w = g/R; a polynomial in w**2 is expanded
  around w**2 = 1, so that at C = 1 (w = +-1 exactly) the cancelling I - w w^T of a norm's
  Hessian drops out exactly.
* **Close norms.** Two norms A = |g|, B = |h| of vectors whose difference g - h is shorter than
  they are (a - p + eps and a - n + eps share the anchor; A - B is fused by
  :mod:`lossgen.fuse_rows`): their derivatives are differences of one function at the two
  vectors (the unit vectors' G/A - H/B, the Hessian's S/A**3 - T/B**3 and h h^T/B**3 - g g^T/A**3),
  which cancel where the vectors are close or one element dominates both. They are written
  (:data:`CLOSE_NORM_FORMS`, :func:`_close_outer`) in this element's G and H, the rests S and T
  (each norm's compensated sum less the element's own square), their difference E and
  A - B = D/(A + B), so that what cancels is subtracted exactly; each form where it holds.
* **A norm at 0.** Where the loss reads a sum of squares S = sum(g**2) only through powers of
  nonnegative exponent (a norm's kink at 0, not a pole), each product of a derivative with a
  negative power of S is 0 where g is the zero vector (:func:`at_zero_norm`): the unit vector and
  its derivative at 0 by the almost-everywhere convention (sign(0) = 0), not 0/0.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import sympy as sp
from sympy.codegen.cfunctions import expm1
from sympy.core.traversal import bottom_up

from .derive import tidy
from .derive_rows import HessianBlock, Reduction, unit_inputs, varies_along_row
from .domains import axis_ranges, nonnegative_on
from .exact_rows import in_exact_arithmetic, monomials
from .fuse_rows import MAX_OPS, accurate, accurate_form, close_summands
from .reductions import ROW_SIZE, onehot
from .stabilise import apply_last, direct_form, spec_domains
from .vocabulary import (binary_scale, exact_sum, exprel, fma, group, in_scale, real_group, softmax_tie,
                         softmax_tie_helper, terms_size, two_scaled)


def _at_index(expr: sp.Expr, derivation) -> sp.Expr:
    """Piecewise over the elements that onehot(...) in ``expr`` singles out."""
    for node in sorted(expr.atoms(onehot), key=sp.default_sort_key):
        index = node.args[0]
        own = {r.symbol: r.summand for r in derivation.reductions
               if r.kind == "take" and r.index == index}
        own.update({r.symbol: r.summand for r in derivation.reductions
                    if r.kind in ("max", "min") and r.index == index})
        at = expr.xreplace({node: sp.S.One}).xreplace(own)
        elsewhere = expr.xreplace({node: sp.S.Zero})
        if at == elsewhere:
            return at
        return sp.Piecewise((_at_index(at, derivation), sp.Eq(node, 1)), (_at_index(elsewhere, derivation), True))
    return expr


def _log_weights(derivation) -> list[tuple[sp.Symbol, sp.Symbol, sp.Expr, sp.Expr, Reduction]]:
    """(x, u, x in terms of u, u in terms of x, R) for each logsumexp R whose summand is linear
    in one element x."""
    found = []
    for n, r in enumerate(derivation.reductions):
        if r.kind != "logsumexp":
            continue
        variables = r.summand.free_symbols & derivation.element_symbols
        if len(variables) != 1:
            continue
        (x,) = variables
        slope = sp.diff(r.summand, x)
        if slope == 0 or slope.free_symbols & {x}:
            continue
        offset = sp.expand(r.summand - slope * x)
        if offset.free_symbols & {x}:
            continue
        u = sp.Symbol(f"_u{n}", nonpositive=True)
        found.append((x, u, (u + r.symbol - offset) / slope, r.summand - r.symbol, r))
    return found


def _complement_weights(expr: sp.Expr, u: sp.Symbol) -> sp.Expr:
    """Where an expression in the log-weight u holds a real power (1 - exp(u))**g (the focal
    factor (1 - p)**gamma), exp(k u) is written (1 - Q)**k with Q = 1 - exp(u) = -expm1(u) and
    the products are expanded, so that the powers of Q combine exactly: Q**g/Q is Q**(g - 1),
    and a difference that cancels where p is close to 1 (f'(u) - f'(u) exp(u)) is f'(u) Q. Where
    u itself appears only in sums and products, it is -Q V with V = 1/exprel(u) = u/(exp(u) - 1),
    so u Q**(g - 1) is -V Q**g: finite at Q = 0 for every g >= 0 (the focal gradient at gamma < 1).
    Taken where u > -log 2 (Q < 1/2, so 1 - Q is exp(u) to working precision); elsewhere the
    expression as it was. Branch by branch of a Piecewise (the onehot split of _at_index)."""
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((_complement_weights(e, u), c) for e, c in expr.args))
    base = 1 - sp.exp(u)
    if not any(p.base == base and not p.exp.is_Integer for p in expr.atoms(sp.Pow)):
        return expr
    q, v = sp.Symbol("_Q", positive=True), sp.Symbol("_V", positive=True)
    in_q = expr.replace(lambda e: isinstance(e, sp.exp) and (e.args[0] / u).is_Integer,
                        lambda e: (1 - q) ** (e.args[0] / u))
    if not any(isinstance(a, sp.Function) and a.has(u) for a in sp.preorder_traversal(in_q)):
        in_q = in_q.xreplace({u: -q * v})  # u = log(1 - Q) = -Q V, V = 1/exprel(u) in [1, 1.45)
    in_q = sp.factor_terms(sp.expand(in_q, power_base=False, power_exp=False, log=False, multinomial=False))
    stable = direct_form(in_q).xreplace({q: group(-expm1(u)), v: 1 / exprel(u)})
    return sp.Piecewise((stable, u > -sp.log(2)), (direct_form(expr), True))


def rest_logsumexp(r: Reduction, index: sp.Expr) -> Reduction:
    """logsumexp of R's summand over the row less the element at ``index`` (-inf where the row
    has no other element): exp(g_k - R') = p_k/(1 - p_y), the softmax over the other classes,
    at most 1 and never 0/0 (where 1 - p_y underflows to 0, every other p_k does too)."""
    return Reduction(sp.Symbol(f"{r.symbol.name}_o", real=True), "logsumexp",
                     sp.Piecewise((-sp.oo, sp.Eq(onehot(index), 1)), (r.summand, True)))


@dataclass(frozen=True)
class SingularTake:
    """A value t = take(h, y) at the indexed class whose complement form (see
    :func:`_complement_weights`) holds a power Q**e of Q = 1 - p_y with e not known to be
    nonnegative (the focal Hessian's Q**(gamma - 1)): t overflows, or is 0*inf, where Q
    underflows (a saturated row), while t p_k is bounded for every other class k (p_k <= Q).
    ``scaled`` is take(h Q, y), whose powers of Q combine exactly (Q**gamma), and ``rest`` the
    logsumexp over the other classes, so that t p_k = scaled exp(g_k - R')."""

    take: Reduction
    scaled: Reduction
    rest: Reduction
    weight: sp.Expr       # g - R, the log-weight log p_k of an element
    rest_weight: sp.Expr  # g - R', its log-weight over the other classes, log pi_k

    @property
    def placeholder(self) -> sp.Symbol:
        """pi_k while the rules run (a weight in [0, 1]; as exp(g - R') they would take its
        exponent apart in the element's log-weight); exp(g - R') afterwards."""
        return sp.Symbol(f"_pi{self.rest.symbol.name}", positive=True)


def singular_takes(derivation) -> list[SingularTake]:
    """The singular takes of a derivation (see :class:`SingularTake`): a take at index y of an
    element expression in the log-weight u of a logsumexp R, whose complement form has a power
    of Q = -expm1(u) with an exponent not known to be nonnegative; each with take(h Q, y) and
    the logsumexp of R's summand over the row less y."""
    found = []
    for t in derivation.reductions:
        if t.kind != "take":
            continue
        for x, u, x_of_u, back, r in _log_weights(derivation):
            if x not in t.summand.free_symbols:
                continue
            complement = _complement_weights(sp.factor_terms(t.summand.subs(x, x_of_u)), u)
            if not isinstance(complement, sp.Piecewise):
                continue
            q = group(-expm1(u))
            if any(p.base == q and p.exp.is_nonnegative is not True for p in complement.args[0][0].atoms(sp.Pow)):
                scaled = Reduction(sp.Symbol(f"{t.symbol.name}_q", real=True), "take",
                                   t.summand * (1 - sp.exp(back)), t.index)
                rest = rest_logsumexp(r, t.index)
                found.append(SingularTake(t, scaled, rest, back, r.summand - rest.symbol))
                break
    return found


def _over_the_rest(expr: sp.Expr, singular) -> sp.Expr:
    """In the branch of :func:`_at_index` where this element k is not the indexed class y, each
    term t p_k**n of a singular take t (see :class:`SingularTake`) is scaled p_k**(n - 1) pi_k
    with pi_k = exp(g_k - R') = p_k/(1 - p_y): both factors are finite on every row, while
    t alone is inf or nan on a saturated one (the focal Hessian at gamma < 1). Where a term holds
    t without a weight, the branch is left as it was."""
    if not singular or not isinstance(expr, sp.Piecewise):
        return expr
    branches, at = [], set()
    for e, c in expr.args:
        if c is sp.true and at:
            e = _rest_branch(e, [s for s in singular if s.take.index in at])
        elif isinstance(e, sp.Piecewise):
            e = _over_the_rest(e, singular)
        branches.append((e, c))
        if isinstance(c, sp.Eq) and isinstance(c.lhs, onehot) and c.rhs == 1:
            at.add(c.lhs.args[0])
    return sp.Piecewise(*branches)


def _rest_branch(expr: sp.Expr, singular) -> sp.Expr:
    """t p_k**n -> scaled p_k**(n - 1) pi_k in each term of ``expr`` (a branch where k != y), n
    a positive integer; ``expr`` as it was where a term holds t otherwise."""
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((_rest_branch(e, singular), c) for e, c in expr.args))
    for s in singular:
        if s.take.symbol not in expr.free_symbols:
            continue
        terms = []
        for term in sp.Add.make_args(sp.expand_mul(expr)):
            if s.take.symbol not in term.free_symbols:
                terms.append(term)
                continue
            rest = term / s.take.symbol
            powers = {f: sp.cancel(f.args[0] / s.weight) for f in sp.Mul.make_args(rest) if isinstance(f, sp.exp)}
            weights = [(f, n) for f, n in powers.items() if n.is_Integer and n > 0]
            if len(weights) != 1 or s.take.symbol in rest.free_symbols:
                return expr
            ((w, n),) = weights
            terms.append(rest / w * s.scaled.symbol * sp.exp((n - 1) * s.weight) * s.placeholder)
        expr = sp.Add(*terms)
    return expr


def weight_sum(r: Reduction) -> Reduction:
    """sum_j exp(g_j - R) for R = logsumexp(g): 1, but computed (a compensated sum, see
    :func:`sum_parts`) from the same rounded weights as the element expressions, so that its
    parts less some of those weights are the rest of the row (:func:`_simplex_weights`)."""
    return Reduction(sp.Symbol(f"{r.symbol.name}_w", real=True), "sum", sp.exp(r.summand - r.symbol))


def weights_less(r: Reduction, *taken: sp.Expr) -> sp.Expr:
    """The rest of the row: :func:`weight_sum` of R less the weights ``taken`` (the same floats
    as it summed), one exact sum of its parts, its error part's own errors (:func:`error_tail`)
    among them."""
    total = weight_sum(r)
    hi, error = sum_parts(total)
    return exact_sum(hi, *(-w for w in taken), error, error_tail(total))


def top_two(r: Reduction) -> tuple[Reduction, Reduction, Reduction, Reduction]:
    """The row's two largest summands g of R = logsumexp(g), each with its arg-max a1, a2 (the
    first on ties; a2 = a1 at C = 1, where the second is -inf), and the log-weights g - R at a1
    and a2 (takes, so that their weights are the floats that :func:`weight_sum` sums): what
    :func:`tie_difference` reads. The second is a max of its own over the row less a1, in the
    logsumexp's second pass (a runner-up kept in the first pass, whose max the logsumexp shares,
    made the fused gradient and Hessian of Poly-1 slower still: 1.22-1.26 times as long as
    before, against 1.15-1.19, at C = 3 and 10)."""
    name = r.symbol.name
    a1, a2 = (sp.Symbol(f"{name}_a{n}", integer=True) for n in (1, 2))
    first = Reduction(sp.Symbol(f"{name}_g1", real=True), "max", r.summand, a1)
    second = Reduction(sp.Symbol(f"{name}_g2", real=True), "max",
                       sp.Piecewise((-sp.oo, sp.Eq(onehot(a1), 1)), (r.summand, True)), a2)
    at_first, at_second = (Reduction(sp.Symbol(f"{name}_u{n}", real=True), "take", r.summand - r.symbol, a)
                           for n, a in ((1, a1), (2, a2)))
    return first, second, at_first, at_second


def value_indices(derivation) -> set:
    """The arg-maxes of :func:`top_two` that a program reads: they single out an element inside
    a value (:func:`tie_difference`), not a branch of the element's expression as y does."""
    tops = [q for r in derivation.reductions if r.kind == "logsumexp" for q in top_two(r)[:2]]
    return {q.index for q in tops if q in derivation.reductions}


def tie_difference(u: sp.Symbol, r: Reduction) -> sp.Expr:
    """1 - 2 p_k = sum_{j != k} p_j - p_k for this element's softmax weight p_k = exp(u) of
    R = logsumexp(g): 0 where class k ties for the row's mass with the largest other class m
    (Poly-1's Hessian, p_k (w_y (1 - p_k) + eps p_y (1 - 2 p_k))), where the rounded weights
    subtracted lose the tie's digits (relative error 2e-7 at s = (0.3, 0.3 + 1e-9, -30)). As
    (p_m - p_k) + the rest of the row, p_m - p_k from the logits' difference, exact where they
    are close (Sterbenz): p_k expm1(g_m - g_k) at the arg-max (m the second largest), -p_m
    expm1(g_k - g_m) at the second largest (m the arg-max), both arguments <= 0 (no overflow);
    the rest is the weights' compensated sum less the two largest weights (:func:`top_two`).
    Where |1 - 2 p_k| >= 1/2, and at any other class (at most a third of the row), 1 - 2 p_k as
    it is: it cannot cancel there. Where a class of the two largest ties with several others
    together (p = (1/2, 1/4, 1/4)), the rest, a sum of rounded weights, cancels p_m - p_k (relative
    error 4.7e-8 at s = (0, log(1/2), log(1/2) + 1e-9)): the form at the arg-max is a
    :class:`softmax_tie`, which the kernels take again from the logits' differences in double-word
    arithmetic there. At the second largest, p_m - p_k and the rest are both >= 0: no cancellation."""
    first, second, at_first, at_second = top_two(r)
    p1, p2 = sp.exp(at_first.symbol), sp.exp(at_second.symbol)
    rest = weights_less(r, p1, p2)
    g, plain = r.summand, 1 - 2 * sp.exp(u)
    at_first_form = sp.exp(u) * expm1(second.symbol - g)
    return sp.Piecewise((plain, sp.Abs(plain) >= 0.5),  # no cancellation: no expm1 (most rows)
                        (softmax_tie(at_first_form + rest, terms_size(at_first_form, rest), first.index,
                                     softmax_tie_helper(r)), sp.Eq(onehot(first.index), 1)),
                        (-p1 * expm1(g - first.symbol) + rest, sp.Eq(onehot(second.index), 1)),
                        (plain, True))


def _as_tie_difference(expr: sp.Expr, tie: sp.Expr, d: sp.Symbol) -> sp.Expr:
    """Each factor +-tie of ``expr`` (a sum of the weights, 1 - 2 E on the simplex) as +-d."""
    return expr.replace(lambda a: isinstance(a, sp.Add) and sp.expand(a - tie) == 0, lambda a: d).replace(
        lambda a: isinstance(a, sp.Add) and sp.expand(a + tie) == 0, lambda a: -d)


def _simplex_weights(expr: sp.Expr, u: sp.Symbol, back: sp.Expr, r: Reduction, derivation,
                     apart: frozenset = frozenset()) -> tuple[sp.Expr, dict]:
    """Two softmax weights of one row, E = exp(u) = p_k of this element and F = p_y of the
    class that take(., y) picks (k != y: the branch of _at_index where onehot(y) is 0), and the
    rest O = 1 - E - F = sum_{j not in {k, y}} p_j. Where the expression is a polynomial P(E, F)
    that vanishes at the vertex E = 1 or F = 1 of the simplex E + F + O = 1 (its terms cancel
    where one class holds the row's mass: the Hessian of Poly-1, p_k ((1 - p_k)(w_y + eps p_y)
    - eps p_y p_k)), it is written homogeneous in (E, F, O): each term of degree d times
    (E + F + O)**(D - d), D the degree of P, expanded and collected. No constant is left to
    cancel against the weights; O is the weights' compensated sum less E and F, its error part
    summed exactly too (:func:`error_tail`: exactly the other classes' weights, where E + F is
    most of the row), and a coefficient such as
    w_y - eps is computed before it multiplies a weight. A factor F + O - E = 1 - 2 E of the
    collected form, which cancels where class k ties with another, is D of
    :func:`tie_difference`. Without F (at the element y itself, or where no take is read), P(E)
    is written homogeneous in (E, Q), Q = 1 - E = -expm1(u), where that gives a factor Q - E = D
    (Poly-1's Hessian at y, p_y (1 - p_y)(w_y - eps (1 - 2 p_y))). Where it has D, the form
    holds only where a class may tie with k: elsewhere it is collected by monomial
    (:func:`_away_from_ties`). Returns the expression with
    the symbols E, F, O and D in place, and {symbol: what it stands for}, to be put in after the
    rules and splits (which would take E = 1 + expm1(u) apart again)."""
    if isinstance(expr, sp.Piecewise):
        branches, placeholders, singled_out = [], {}, set(apart)
        for e, c in expr.args:
            e, found = _simplex_weights(e, u, back, r, derivation, frozenset(singled_out) if c is sp.true else apart)
            branches.append((e, c))
            placeholders.update(found)
            if isinstance(c, sp.Eq) and isinstance(c.lhs, onehot) and c.rhs == 1:
                singled_out.add(c.lhs.args[0])  # later branches: this element is not at that index
        return sp.Piecewise(*branches), placeholders
    takes = [t for t in derivation.reductions if t.kind == "take" and t.index in apart and t.summand == back
             and t.symbol in expr.free_symbols]
    # O = 1 - E - F, or Q = 1 - E without F: placeholders of their own, since both branches meet
    e_, f_, o_ = (sp.Symbol(f"_{name}{r.symbol.name}", positive=True) for name in ("E", "F", "O" if takes else "Q"))
    d_ = sp.Symbol(f"_D{r.symbol.name}", real=True)
    weights = [(u, e_)] + [(min(takes, key=lambda t: t.symbol.name).symbol, f_) for _ in takes[:1]]
    gens = [w for _, w in weights]
    polynomial = expr
    for symbol, weight in weights:
        polynomial = polynomial.replace(
            lambda a, symbol=symbol: isinstance(a, sp.exp) and (a.args[0] / symbol).is_Integer,
            lambda a, symbol=symbol, weight=weight: weight ** (a.args[0] / symbol))
    if polynomial.free_symbols & {symbol for symbol, _ in weights}:
        return expr, {}
    try:
        polynomial = sp.Poly(sp.expand(polynomial), *gens)
    except sp.PolynomialError:
        return expr, {}
    terms = polynomial.terms()
    low = tuple(min(m[n] for m, _ in terms) for n in range(len(gens)))  # the monomial that every term holds
    reduced = sp.Add(*[c * sp.Mul(*(g ** (i - k) for g, i, k in zip(gens, m, low))) for m, c in terms])
    vertices = [{g: int(g == at) for g in gens} for at in gens]
    vanishes = any(sp.expand(reduced.xreplace(vertex)) == 0 for vertex in vertices)
    degree = sp.Poly(reduced, *gens).total_degree()
    homogeneous = sp.Poly(sp.expand(sp.Add(*[c * sp.Mul(*(g ** i for g, i in zip(gens, m)))
                                              * (sp.Add(*gens) + o_) ** (degree - sum(m))
                                              for m, c in sp.Poly(reduced, *gens).terms()])), *gens, o_)
    collected = _as_tie_difference(_by_coefficient(homogeneous), sp.Add(*gens[1:]) + o_ - e_, d_)
    if not ((vanishes and takes) or d_ in collected.free_symbols):
        return expr, {}
    e = sp.exp(u)
    placeholders = {e_: e, d_: tie_difference(u, r)}
    if takes:
        f = sp.exp(weights[1][0])
        placeholders.update({f_: f, o_: weights_less(r, e, f)})
    else:
        placeholders[o_] = -expm1(u)
    if d_ in collected.free_symbols:
        collected = _away_from_ties(homogeneous, e_, collected)
    result = sp.Mul(*(g ** k for g, k in zip(gens, low))) * collected
    return result, {k: v for k, v in placeholders.items() if k in result.free_symbols}


def _away_from_ties(homogeneous: sp.Poly, e_: sp.Symbol, tie_form: sp.Expr) -> sp.Expr:
    """Where |1 - 2 E| >= 1/2 (no class ties with this one), the homogeneous polynomial collected
    by monomial, each coefficient (a combination of the parameters) computed before it meets a
    weight; between, ``tie_form``, collected by the parameters with D = 1 - 2 E
    (:func:`tie_difference`). Near a vertex the tie form cancels where the parameters do: Poly-1's
    Hessian at the true class, p (1 - p)(w_y - eps (1 - 2 p)), is E Q (w_y (E + Q) - eps D) there,
    which at w_y = eps (the defaults, w = 1 and eps = 1) and a small p cancelled to 2 eps p from
    terms of 1 (relative error 1.5 at s = (-40, 3, 2), y = 0); by monomial it is
    E Q ((w_y + eps) E + (w_y - eps) Q), w_y - eps exact."""
    by_monomial = sp.Add(*[sp.factor(c) * sp.Mul(*(g ** k for g, k in zip(homogeneous.gens, m)))
                           for m, c in homogeneous.terms()])
    return sp.Piecewise((by_monomial, sp.Abs(1 - 2 * e_) >= 0.5), (tie_form, True))


def _by_coefficient(polynomial: sp.Poly) -> sp.Expr:
    """A polynomial in the weights with coefficients in the parameters, as sum_K K Q_K(weights)
    over the coefficients' symbolic parts K, each Q_K factored: Poly-1's Hessian (w_y + eps) F**2
    + (w_y - eps) E F + ... holds eps F (F - E + O), whose F - E is exact where two classes tie,
    rather than eps F**2 and eps E F rounded apart against a small w_y."""
    parts: dict = {}
    for monomial, c in polynomial.terms():
        power = sp.Mul(*(g ** k for g, k in zip(polynomial.gens, monomial)))
        for term in sp.Add.make_args(sp.expand(c)):
            number, symbolic = term.as_coeff_Mul()
            parts[symbolic] = parts.get(symbolic, sp.S.Zero) + number * power
    return sp.Add(*[k * sp.factor(q) for k, q in sorted(parts.items(), key=lambda kq: sp.default_sort_key(kq[0]))])


def _difference_first(e, inputs):
    """c*a - c*b + rest -> c*(a - b) + rest for axis inputs a and b: a - b is one rounding (exact
    where a and b are close: the gradient 2 (p - y) - 2 p E/D of Dice at p = y), then rest is
    added; in any other order, rest is lost against c*a before c*b cancels it."""
    if not isinstance(e, sp.Add) or len(e.args) < 3:
        return None
    for t in e.args:
        for a in sorted(sp.Mul.make_args(t), key=sp.default_sort_key):
            if a not in inputs:
                continue
            c = t / a
            for u in e.args:
                b = -u / c
                if u is not t and b in inputs and b != a:
                    rest = [v for v in e.args if v is not t and v is not u]
                    return sp.Add(c * group(a - b), *rest)
    return None


def _differences_first(expr: sp.Expr, derivation) -> sp.Expr:
    inputs = {derivation.spec.symbols[i.name] for i in derivation.spec.inputs if i.axis}
    return bottom_up(expr, lambda e: (_difference_first(e, inputs) or e) if isinstance(e, sp.Add) else e)


def _exp_weights(expr: sp.Expr, derivation) -> tuple[sp.Expr, dict]:
    """exp(k (g - R)) -> exp(k u) for each R = logsumexp(g), u <= 0 a symbol: the log-weights
    of a summand g that :func:`_log_weights` cannot solve for (not linear in one element:
    ArcFace's s cos(acos(c) + m) at the true class). g is taken at each value of its onehot
    terms, as :func:`_at_index` left them. Returns the expression and {u: g - R}, g in its
    stable form (:func:`direct_form`), as the reduction computes it: exp(u) at a row's only
    class is then exactly 1 (ArcFace's s cos(m + acos(c)) is s (c cos(m) - sqrt((1 - c)(1 + c))
    sin(m)) in the reduction; left raw here, expm1(u) at C = 1 was 1e-16, not 0)."""
    back, replacements = {}, {}
    for n, r in enumerate(derivation.reductions):
        if r.kind != "logsumexp":
            continue
        nodes = sorted(r.summand.atoms(onehot), key=sp.default_sort_key)
        variants = []
        for values in itertools.product((sp.S.Zero, sp.S.One), repeat=len(nodes)):
            g = r.summand.xreplace(dict(zip(nodes, values)))
            if g not in variants:
                variants.append(g)
        for e in expr.atoms(sp.exp):
            k = -sp.diff(e.args[0], r.symbol)
            if e in replacements or not (k.is_Integer and k > 0):
                continue
            for m, g in enumerate(variants):
                if sp.expand(e.args[0] - k * (g - r.symbol)) == 0:
                    u = sp.Symbol(f"_w{n}_{m}", nonpositive=True)
                    back[u], replacements[e] = direct_form(g) - r.symbol, sp.exp(k * u)
                    break
    expr = expr.xreplace(replacements)
    for u in back:
        expr = _factor_at_one(expr, u)
    return expr, back


def _factor_at_one(expr: sp.Expr, u: sp.Symbol) -> sp.Expr:
    """A polynomial q(E) in the weight E = exp(u) with q(1) = 0, as (E - 1) q1(E): the terms
    cancel where the weight is 1 (a confident true class), and E - 1 becomes expm1(u)."""
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((_factor_at_one(e, u), c) for e, c in expr.args))
    weight = sp.Symbol("_E", positive=True)
    polynomial = expr.subs(sp.exp(u), weight)
    if u in polynomial.free_symbols or weight not in polynomial.free_symbols:
        return expr
    try:
        polynomial = sp.Poly(sp.expand(polynomial), weight)
    except sp.PolynomialError:
        return expr
    if polynomial.degree() < 1 or sp.expand(polynomial.eval(1)) != 0:
        return expr
    quotient, _ = sp.div(polynomial, sp.Poly(weight - 1, weight))
    return (sp.exp(u) - 1) * sp.factor_terms(quotient.as_expr().subs(weight, sp.exp(u)))


def _unit_weights(derivation) -> list[tuple]:
    """(x, w, x in terms of w, w in terms of x, S) for each S = sum(g**2) whose root is a norm
    R = sqrt(S) and whose g is linear in an element x that no other reduction reads: w = g/R
    is the unit vector's element."""
    found = []
    for n, r in enumerate(derivation.reductions):
        if r.kind != "sum" or not (isinstance(r.summand, sp.Pow) and r.summand.exp == 2):
            continue
        g = r.summand.base
        others = set().union(*(q.summand.free_symbols for q in derivation.reductions if q is not r))
        for x in sorted(g.free_symbols & derivation.element_symbols - others, key=sp.default_sort_key):
            slope = sp.diff(g, x)
            if slope == 0 or slope.free_symbols & derivation.element_symbols:
                continue
            w = sp.Symbol(f"_n{n}", real=True)
            found.append((x, w, (w * sp.sqrt(r.symbol) - sp.expand(g - slope * x)) / slope,
                          g / sp.sqrt(r.symbol), r.symbol))
            break
    return found


def _around_unit(expr: sp.Expr, w: sp.Symbol) -> sp.Expr:
    """A polynomial q(w**2) as q(1) + (w - 1)(w + 1) q1(w**2): at C = 1 the unit vector's
    element is exactly +-1 and the terms that cancel there (I - w w^T of a norm's Hessian,
    times a large 1/R) drop out exactly."""
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((_around_unit(e, w), c) for e, c in expr.args))
    square = sp.Symbol("_W", positive=True)
    try:
        polynomial = sp.Poly(sp.expand(expr), w)
    except sp.PolynomialError:
        return expr
    if polynomial.degree() < 2 or any(k % 2 for (k,), c in polynomial.terms() if c != 0):
        return expr
    q = sp.Poly(polynomial.as_expr().subs(w**2, square), square)
    at_one = q.eval(1)
    quotient, _ = sp.div(q - sp.Poly(at_one, square), sp.Poly(square - 1, square))
    return _simplified(at_one) + group((w - 1) * (w + 1)) * _simplified(quotient.as_expr().subs(square, w**2))


def _simplified(expr: sp.Expr) -> sp.Expr:
    """Each branch tidied on its own (a coefficient whose terms cancel exactly: 1/R - 1/R)."""
    expr = sp.piecewise_fold(expr)
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((tidy(e), c) for e, c in expr.args))
    return tidy(expr)


def sum_parts(r) -> tuple[sp.Symbol, sp.Symbol]:
    """The two parts of a compensated row sum R (see emit_rows.LOOP_CODE): the running sum
    and the rounding errors it dropped; R = hi + error, to twice the working precision."""
    return sp.Symbol(f"{r.symbol.name}_hi", real=True), sp.Symbol(f"{r.symbol.name}_error", real=True)


def error_tail(r) -> sp.Symbol:
    """The rounding errors of a compensated sum's error part, where a form reads them (see
    emit_rows.LOOP_CODE "sum_twofold"): R = hi + error + tail, the error part summed exactly too.
    The rest of a row of softmax weights, the weights' sum less the largest, holds the small
    weights in the error part alone, rounded there to a unit of the largest of them: Poly-1's
    Hessian at the defaults had relative error 0.69 at s = (58.0, -21.6, -58.3), y = 1, where
    O = e^-116 is the rest beside p_y = e^-80 (1.5e-12 at s = (0, 418.2, 10.16), y = 2)."""
    return sp.Symbol(f"{r.symbol.name}_error_tail", real=True)


def _own_term_apart(expr: sp.Expr, derivation, held: dict) -> sp.Expr:
    """c R F - c g, with R = sum_j g_j and g this element's summand, as
    c (R (F - 1) + (R - g)) where F >= 1/2: R - g = sum_{j != k} g_j is computed from R's two
    parts (hi - g) + error, exactly where g is most of R, and F - 1 becomes expm1 by the rules.
    This is p_k sum(w t) - w_k t_k, the gradient of cross-entropy with soft targets, at a
    confident class (p_k ~ 1, t_k ~ 1): rounded apart, both terms cancel to nothing. The g in
    hi - g is held apart from the later rewrites (in ``held``), so that it is computed as the
    sum's loop computes it: at C = 1, hi - g is then exactly 0."""
    sums = [r for r in derivation.reductions if r.kind == "sum"]
    if not sums or not isinstance(expr, sp.Basic):
        return expr

    def rewrite(e):
        if not isinstance(e, sp.Add):
            return e
        for r in sums:
            for term in e.args:
                rest = e - term
                # cheap necessary conditions first: rest = -c g, with c a factor of term/R
                if r.symbol not in term.free_symbols or \
                        not rest.free_symbols <= r.summand.free_symbols | term.free_symbols:
                    continue
                quotient = term / r.symbol
                if r.symbol in quotient.free_symbols or not quotient.free_symbols & derivation.element_symbols:
                    continue
                for c in (sp.S.One, sp.S.NegativeOne) + sp.Mul.make_args(quotient):
                    # factor = expand(term/R) is costly (4 s for global SSIM's gradient terms): the
                    # match rest = -c g is tested first, on the factors of term/R as it stands
                    if sp.expand(rest + c * r.summand) != 0:
                        continue
                    factor = sp.expand(quotient)
                    weight = sp.expand(factor / c)
                    if c in (sp.S.One, sp.S.NegativeOne) + sp.Mul.make_args(factor) and not weight.is_Number:
                        hi, error = sum_parts(r)
                        own = sp.Symbol(f"_{r.symbol.name}_own", real=True)
                        held[own] = -r.summand
                        others = exact_sum(hi, own, error)
                        return sp.Piecewise((c * (r.symbol * (weight - 1) + others), weight >= sp.S.Half),
                                            (e, True))
        return e

    return bottom_up(expr, rewrite)


def _unit_complement(expr: sp.Expr, derivation, held: dict) -> sp.Expr:
    """a s/R - a R/R, with R = sum_k s_k and s this element's summand, as -a (R - s)/R: R - s =
    sum_{k != j} s_k from R's two parts (hi - s) + error, exact where s is most of R. This is
    1 - u_j**2 of a unit vector u = g/|g| (a norm's Hessian, m g_j**2/|g|**3 - m/|g|): rounded
    apart, the two terms cancel where g_j holds nearly all of the norm (contrastive's Hessian at
    x1 = 1e-8 (-1, 7.5e-4), x2 = 0, eps = 0 had relative error 2.8e-11). The s in hi - s is the
    stable summand, held apart from the later rewrites (as :func:`_own_term_apart`'s), so that
    it is the float the sum's loop added. Branch by branch of the Piecewises folded together;
    ``expr`` as it was where no pair of terms has the form."""
    sums = [r for r in derivation.reductions if r.kind == "sum" and r.summand.free_symbols & derivation.element_symbols]
    if not sums or not isinstance(expr, sp.Expr) or not expr.free_symbols & {r.symbol for r in sums} \
            or sp.count_ops(expr) > MAX_OPS:
        return expr
    found = []

    def rewrite(e):
        if not isinstance(e, sp.Add) or len(e.args) > 8:
            return e
        for r in sums:
            # the second term, -weight R, is a row value: without one there is no pair
            if not any(r.symbol in t.free_symbols and not t.free_symbols & derivation.element_symbols
                       for t in e.args):
                continue
            for first in e.args:
                if not first.free_symbols & derivation.element_symbols:
                    continue
                # first = weight * s, the weight free of the element (s or -s as the derivative
                # with respect to another prediction writes it: (x1 - x2)(x2 - x1))
                weight = sp.cancel(first / r.summand)
                if weight.free_symbols & derivation.element_symbols:
                    continue
                second = next((t for t in e.args if t != first and sp.expand(t + weight * r.symbol) == 0), None)
                if second is None:
                    continue
                hi, error = sum_parts(r)
                own = sp.Symbol(f"_{r.symbol.name}_own", real=True)
                held[own] = -stabilise_element(r.summand, derivation)
                found.append(r)
                return e - first - second - weight * exact_sum(hi, own, error)
        return e

    folded = bottom_up(sp.piecewise_fold(expr), rewrite)
    return folded if found else expr


def _row_total(node: sp.Expr, sums: dict, element_symbols) -> bool:
    """Is ``node`` a row total: sum reductions with coefficient 1 plus row constants (Dice's
    denominator sum(p**2) + sum(y**2) + smooth)?"""
    if not isinstance(node, sp.Add):
        return False
    inside = [a for a in node.args if a in sums]
    rest = [a for a in node.args if a not in sums]
    return bool(inside) and not any(a.free_symbols & (set(sums) | element_symbols) for a in rest)


def _total_less_own(expr: sp.Expr, derivation) -> tuple[sp.Expr, dict]:
    """A row total T = R_1 + ... + R_m + c (sum reductions and row constants) that divides an
    element expression, less a multiple of an element term: where the numerator, a polynomial in
    T and other row values M with coefficients in this element, has a coefficient with the linear
    factor T - k g (g the own summand g_a(j) of a reduction R_a in T, k a number; a coefficient
    T**i (a T + b) with -b/a = k g), each coefficient
    is divided by T - k g with remainder (after the power of T that divides it: T**i (q Z + r)), and
    T - k g = Z is computed as one exact sum of T's terms, each sum reduction as its compensated
    parts, and k copies of -g (each exact): sum_m T**i_m (q_m(T) Z + r_m(T)) M_m. The Hessian
    diagonal of Dice, (2 T (T - E) - 8 p (p - y) T + 8 p**2 E)/T**3 with E = sum((p - y)**2), is
    2 (Z (T - E) + 4 p y T)/T**3 with
    Z = T - 4 p**2: at y = (1, 1e-300), p = (1, 1), smooth = 1 the terms of 0.375 cancel exactly
    in Z = 0 and 4 p y T = 1.6e-299 is left, where rounded apart they left 0. Returns the
    expression with Z as a placeholder and {placeholder: exact sum}; unchanged (and {}) where no
    coefficient has such a factor or nothing is divided out."""
    if not isinstance(expr, sp.Expr) or isinstance(expr, sp.Piecewise) or expr.has(sp.Piecewise):
        return expr, {}
    sums = {r.symbol: r for r in derivation.reductions if r.kind == "sum"}
    if not expr.free_symbols & set(sums) or sp.count_ops(expr) > MAX_OPS:
        return expr, {}  # expanded, a large expression (global SSIM's Hessian) costs seconds
    numerator, denominator = sp.fraction(sp.together(expr))
    totals = []
    for factor in sp.Mul.make_args(denominator):
        base = factor.base if isinstance(factor, sp.Pow) else factor
        if _row_total(base, sums, derivation.element_symbols) and base not in totals:
            totals.append(base)
    values = {r.symbol for r in derivation.reductions}
    for total in totals:
        inside = sorted((a for a in total.args if a in sums), key=sp.default_sort_key)
        sigma = sp.Dummy("T", positive=True)
        first = inside[0]
        f = sp.expand(numerator.xreplace({total: sigma}).subs(first, sigma - (total - first)))
        if first in f.free_symbols:
            continue
        others = sorted(f.free_symbols & values, key=sp.default_sort_key)
        try:
            polynomial = sp.Poly(f, sigma, *others)
        except sp.PolynomialError:
            continue
        # the coefficient of each monomial M in the other row values, as {power of T: element part}
        coefficients = {}
        for monomial, c in polynomial.terms():
            coefficients.setdefault(monomial[1:], {})[monomial[0]] = c
        found = None
        for powers in coefficients.values():
            # T**i (a T + b), linear after its power of T: the factor T - t, t = -b/a
            low = min(powers)
            if {d - low for d in powers} != {0, 1}:
                continue
            a, b = powers[low + 1], powers[low]
            if b.free_symbols & values or len(sp.Add.make_args(a)) != len(sp.Add.make_args(b)):
                continue  # b = -k g a, expanded, has a's terms, each times the monomial g
            for r in inside:
                g = sums[r].summand
                if not b.free_symbols <= a.free_symbols | g.free_symbols:
                    continue
                k = sp.cancel(-b / (a * g))
                if k.is_Number and k > 0:
                    found = (sp.expand(k * g), k, r)
                    break
            if found:
                break
        if found is None:
            continue
        t, k, r = found
        z = sp.Dummy("Z", real=True)
        multiple, rest = [], []
        for monomial, powers in coefficients.items():
            # T**i c'(T) with c'(0) != 0, and c' = q Z + r: the remainder r keeps the power of T
            low = min(powers)
            shifted = sp.Add(*(c * sigma**(d - low) for d, c in powers.items()))
            q, rem = sp.div(sp.Poly(shifted, sigma), sp.Poly(sigma - t, sigma))
            power = sigma**low * sp.Mul(*(o**e for o, e in zip(others, monomial)))
            multiple.append(q.as_expr() * power)
            rest.append(rem.as_expr() * power)
        new = (z * sp.Add(*multiple) + sp.Add(*rest)).xreplace({sigma: total})
        copies = [-sums[r].summand] * int(k) if k.is_Integer and k <= 8 else [-k * sums[r].summand]
        parts = [part for a in total.args for part in (sum_parts(sums[a]) if a in sums else (a,))] + copies
        return new / denominator, {z: exact_sum(*parts)}
    return expr, {}


def _second_moment(summand: sp.Expr, rows: set) -> bool:
    """Is ``summand`` a product of two row elements (x**2, x*y): a squared norm or a dot product?"""
    factors = sp.Mul.make_args(summand)
    symbols = [f.base if isinstance(f, sp.Pow) else f for f in factors]
    degree = sum(f.exp if isinstance(f, sp.Pow) else 1 for f in factors)
    return degree == 2 and all(x in rows for x in symbols)


def reference_reductions(x: sp.Symbol, y: sp.Symbol) -> dict:
    """The reductions of y measured against x at x's largest element m (first on ties):
    y = (y_m/x_m) x + r (see :func:`_against_reference`); 'r' is the element expression r_k,
    'cross' the sum of x_k r_k, 'magnitude' that of |x_k r_k| and 'square' that of r_k**2."""
    index = sp.Symbol(f"_am_{x.name}", integer=True, nonnegative=True)
    largest = Reduction(sp.Symbol(f"_mx_{x.name}", nonnegative=True), "max", sp.Abs(x), index)
    xm = Reduction(sp.Symbol(f"_xm_{x.name}", real=True), "take", x, index)
    ym = Reduction(sp.Symbol(f"_ym_{x.name}_{y.name}", real=True), "take", y, index)
    w = group(ym.symbol * x)
    r = sp.Piecewise(((fma(xm.symbol, y, -w) + fma(-ym.symbol, x, w)) / xm.symbol, sp.Ne(xm.symbol, 0)), (y, True))
    cross = Reduction(sp.Symbol(f"_xr_{x.name}_{y.name}", real=True), "sum", x * r)
    magnitude = Reduction(sp.Symbol(f"_xra_{x.name}_{y.name}", nonnegative=True), "sum", sp.Abs(x * r))
    square = Reduction(sp.Symbol(f"_rr_{x.name}_{y.name}", nonnegative=True), "sum", group(r)**2)
    return {"max": largest, "xm": xm, "ym": ym, "cross": cross, "magnitude": magnitude, "square": square, "r": r}


def _against_reference(numerator, others, own, sums, derivation):
    """A numerator in O(x y) and O(x**2) (see :func:`_others_apart`) with y written lambda x + r,
    lambda = y_m/x_m at x's largest element m and r_k = (x_m y_k - y_m x_k)/x_m (an exact 2x2
    determinant, two fused multiply-adds), where that leaves no multiple of lambda but
    lambda x_j = y_j - r_j: the numerator in r, O(x r) = O(x y) - lambda O(x**2) and y. Rows that
    are exactly parallel have r = 0 exactly, so that such a numerator (the gradient of a cosine,
    y_j O(x**2) - x_j O(x y) = r_j O(x**2) - x_j O(x r)) is exactly 0 there, where written in y,
    O(x y) and O(x**2) round differently (y = (1e50, 1e50), x = (-40, -40)), and keeps its digits
    where they are nearly parallel (O(x y) - lambda O(x**2) is small, O(x r) is computed small). A
    shifted square O(x**2) + c (torch's epsilon) leaves c y_j. Returns (numerator, others, own,
    sums, {r: y} (r has y's degree and scale), {r: its expression}, {the parts of O(x r): the
    magnitude sum_k |x_k r_k|, which bounds their rounding errors}), or None."""
    for s, o in others.items():
        factors = sp.Mul.make_args(own[s])
        if len(factors) != 2 or not all(f in derivation.element_symbols for f in factors) or sums[s][1][1] != 0:
            continue
        for x, y in (factors, factors[::-1]):
            squares = [t for t in others if own[t] == x**2]
            if not squares or any(own[t] == y**2 for t in others):
                continue
            square = squares[0]
            lam, r, o_new, literal = sp.Dummy("lambda"), sp.Dummy("r", real=True), sp.Dummy("Oxr"), sp.Dummy("y")
            new, sums2, own2 = dict(others), dict(sums), dict(own)
            start, shift = numerator, sums[square][1][1]
            if shift != 0:  # O(x**2) + c as two factors of x's degree: c y_j is then of the same degree
                plain, constant = sp.Dummy("O"), sp.Dummy("c")
                new[square], new[constant] = plain, constant
                sums2[square] = (own[square], (sums[square][1][0], sp.S.Zero), sums[square][2])
                sums2[constant], own2[constant] = (own[square], (shift, sp.S.Zero), constant), own[square]
                start = sp.expand(numerator.xreplace({others[square]: plain + constant}))
            substituted = sp.expand(start.xreplace({y: lam * x + r, o: lam * new[square] + o_new}))
            substituted = sp.expand(substituted.xreplace({lam: (literal - r) / x}))
            if sp.fraction(sp.together(substituted))[1].free_symbols & {x}:
                continue
            parts = reference_reductions(x, y)
            hi, error = sum_parts(parts["cross"])
            del new[s]
            key = parts["cross"].symbol
            new[key] = o_new
            sums2[key] = (x * r, (exact_sum(hi, -x * r, error), sp.S.Zero), key)
            own2[key] = x * r
            return (substituted.xreplace({literal: y}), new, own2, sums2, {r: y}, {r: parts["r"]},
                    {exact_sum(hi, -x * r, error): parts["magnitude"].symbol})
    return None


def _others_apart(expr: sp.Expr, derivation) -> sp.Expr:
    """Sums of the other elements: a quotient whose numerator is a polynomial in second moments
    of the rows (squared norms and dot products) R_a = sum_k g_a(k), with coefficients in this
    element j, and vanishes where the row is element j alone (C = 1: every R_a = g_a(j)), is
    written in O_a = R_a - g_a(j) = sum_{k != j}
    g_a(k), from R_a's compensated parts (hi - g_a(j)) + error. Expanded in the O_a, its terms
    free of them, element j's own contribution, cancel symbolically, so nothing is left to
    cancel in floating point there. This is the Lagrange identity: the gradient of a cosine,
    y_j |x|**2 - x_j x.y = sum_k x_k (y_j x_k - x_j y_k), is y_j O(x**2) - x_j O(x y), exactly 0
    at C = 1 and without cancellation where x_j holds most of the row (x = (1e10, 1)), in one
    pass, not the O(C**2) sum of the identity. A sum shifted by a constant, R + c (a squared norm
    plus torch's epsilon), counts as one sum whose others are O + c. A sum of products that
    keeps its products' errors (Dot2, :func:`product_errors`) gives O its third part and less the
    own product's error, fma(a, b, -a b). Branch by branch of a Piecewise; in binary scales
    (:func:`_in_binary_scale`); where a reference element applies (:func:`_against_reference`),
    each element in the form, in y or in r, whose terms' magnitudes (:class:`terms_size`) are
    smaller."""
    if not isinstance(expr, sp.Expr):
        return expr
    values = {q.symbol for q in derivation.reductions}
    rows = {derivation.spec.symbols[i.name] for i in derivation.spec.inputs if i.axis and not i.shared}
    plain = {r.symbol: r for r in derivation.reductions if r.kind == "sum" and _second_moment(r.summand, rows)}
    if not expr.free_symbols & set(plain):
        return expr
    expr = sp.piecewise_fold(expr)
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((_others_apart(e, derivation), c) for e, c in expr.args))
    # row value -> (own summand g(j), the others O as computed, what the symbol stands for)
    sums, ranges = {}, axis_ranges(derivation.spec)
    for symbol, r in plain.items():
        hi, error = sum_parts(r)
        parts = [hi, -r.summand, error]
        factors = dot2_factors(r, ranges)
        if factors is not None:  # R = hi + error + products; the own product exact, b c + fma(b, c, -b c)
            parts += [products_part(r), -fma(*factors, -r.summand)]
        sums[symbol] = (r.summand, (exact_sum(*parts), sp.S.Zero), symbol)
    shifted = {}
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Add) and node not in shifted:
            inside = [a for a in node.args if a in plain]
            rest = node - sp.Add(*inside)
            if len(inside) == 1 and rest != 0 and not rest.free_symbols & (values | derivation.element_symbols) \
                    and rest.is_nonnegative:
                (r,) = inside
                hi, error = sum_parts(plain[r])
                total = sp.Dummy(f"T{r.name}", positive=True)
                shifted[node] = total
                sums[total] = (plain[r].summand, (exact_sum(hi, -plain[r].summand, error), rest), node)
    expr = expr.xreplace(shifted)
    numerator, denominator = sp.fraction(sp.together(expr))
    present = [s for s in sorted(numerator.free_symbols & set(sums), key=sp.default_sort_key)]
    if not present:
        return expr.xreplace({t: e for e, t in shifted.items()})
    back = {s: sums[s][2] for s in sums}
    try:
        sp.Poly(numerator, *present)
    except sp.PolynomialError:
        return expr.xreplace(back)
    own = {s: sums[s][0] for s in present}
    if sp.expand(numerator.xreplace(own)) != 0:
        return expr.xreplace(back)
    others = {s: sp.Dummy(f"O{s.name}") for s in present}
    polynomial = sp.Poly(sp.expand(numerator.xreplace({s: others[s] + own[s] for s in present})),
                         *others.values())
    numerator = polynomial.as_expr()
    scaled = _in_binary_scale(numerator, others, own, sums, denominator, derivation)
    reference = _against_reference(numerator, others, own, sums, derivation)
    if reference is not None:
        numerator_r, others_r, own_r, sums_r, alias, to_r, magnitudes = reference
        against = _in_binary_scale(numerator_r, others_r, own_r, sums_r, denominator, derivation, alias)
        if against is None:
            return expr.xreplace({t: e for e, t in shifted.items()})
        back_r = {s: sums_r[s][2] for s in sums_r}
        # the size of its terms where O(x r) is taken as sum_k |x_k r_k|: the sum of rounded
        # terms x_k r_k is exact to a few units of that, not of itself
        bound = against.map(lambda e: e.xreplace(magnitudes).xreplace(back_r).xreplace(to_r))
        against = against.map(lambda e: e.xreplace(back_r).xreplace(to_r))
        if scaled is None or scaled.outside != against.outside:
            return against.expr
        # each element in the form whose rounding errors are smaller: y_j O(x**2) - x_j O(x y),
        # O(x y) of the Dot2 sum, exact to its own size, where y is mostly orthogonal to x (and
        # where r lost what lambda x_j held), r_j O(x**2) - x_j O(x r) where it is nearly parallel
        scaled = scaled.map(lambda e: e.xreplace(back))
        return sp.Piecewise((scaled.expr, terms_size(*scaled.terms) < terms_size(*bound.terms)),
                            (against.expr, True))
    if scaled is not None:
        return scaled.expr.xreplace(back)
    apart = {o: sp.Add(*sums[s][1]) for s, o in others.items()}
    terms = [sp.factor_terms(c) * sp.Mul(*(o**k for o, k in zip(others.values(), m)))
             for m, c in polynomial.terms() if c != 0]
    return (sp.Add(*terms).xreplace(apart) / denominator).xreplace(back)


def scale_sum(z: sp.Symbol) -> Reduction:
    """sum_k |z_k|, within a factor sqrt(C) of the row's norm and, unlike sum(z**2), free of
    underflow at z = 1e-300: the scale of the row z (:func:`_in_binary_scale`)."""
    return Reduction(sp.Symbol(f"_l1_{z.name}", nonnegative=True), "sum", sp.Abs(z))


def _in_binary_scale(numerator, others, own, sums, denominator, derivation, alias=None):
    """numerator/denominator with every row z of the second moments measured in a power of two
    s_z near its size (the binary scale of the norm that divides the expression, sqrt(R_z) or
    sqrt(R_z + c), else of sum |z_k|): z = s_z (z/s_z) and a sum of the other
    elements O of degree d_z in each z as prod s_z**d_z (O/prod s_z**d_z); the constant c of a
    shifted sum R + c likewise. Division by a power of two is exact, so an exact cancellation of
    the unscaled terms (O(x**2) - 2 x_j**2 at a constant row) stays exact, and where the numerator
    is homogeneous the scales collect into one factor next to the denominator (s_z/|z|, bounded,
    where |z| divides it): each term is a product of bounded values that neither underflows nor
    overflows (at x = -1e-8 (1, 1, 1), y_j = 1e-300 the Hessian's 3 x_j y_j O(x**2), 2e-324
    before the division by |x|**5 |y|, underflowed). The numerator is summed with every rounding
    error carried along (an exact sum of its rounded terms). None where a second moment is not a
    monomial in the rows or the terms differ in degree."""
    alias = alias or {}  # a symbol measured as a row (r of _against_reference, as y)
    rows = sorted({z for summand, _, _ in sums.values()
                   for z in summand.free_symbols & derivation.element_symbols}, key=sp.default_sort_key)
    if not rows:
        return None
    rows += sorted(alias, key=sp.default_sort_key)
    norm = {}
    for symbol, (summand, _, _) in sums.items():
        base = summand.base if isinstance(summand, sp.Pow) and summand.exp == 2 else None
        if base in rows and symbol in denominator.free_symbols:
            norm.setdefault(base, sp.sqrt(symbol))
    scale = {z: binary_scale(norm[z] if z in norm else scale_sum(z).symbol) for z in rows if z not in alias}
    scale.update({a: scale[z] for a, z in alias.items()})
    norm.update({a: norm[z] for a, z in alias.items() if z in norm})
    degree = {}
    for s, o in others.items():
        try:
            monomial = sp.Poly(own[s], *rows)
        except sp.PolynomialError:
            return None
        if len(monomial.terms()) != 1:
            return None
        degree[o] = monomial.monoms()[0]
    try:
        polynomial = sp.Poly(numerator, *others.values(), *rows)
    except sp.PolynomialError:
        return None
    n = len(others)
    symbols = list(others)
    coefficients = dict(polynomial.terms())
    # pairs of terms a O_a M and b g_a(j) M (g_a: O_a's own summand, of the same degree) as
    # a (O_a + (b/a) g_a) M: that sum from R_a's parts, hi + (b/a - 1) g_a + error, exactly,
    # where rounded apart O_a - 2 x_j**2 of |x|**2 = (1e20, 1e20, 1, ...) drops the 1
    grouped = []
    for a, s in enumerate(symbols):
        for monomial in sorted(coefficients, reverse=True):
            if monomial not in coefficients or monomial[a] < 1:
                continue
            partner = list(monomial)
            partner[a] -= 1
            partner[n:] = [e + d for e, d in zip(partner[n:], degree[others[s]])]
            partner = tuple(partner)
            if partner not in coefficients:
                continue
            ratio = coefficients[partner] / coefficients[monomial]
            if not ratio.is_Number or not isinstance(sums[s][1][0], exact_sum):
                continue
            rest = list(monomial)
            rest[a] -= 1
            grouped.append((coefficients.pop(monomial), tuple(rest), s, ratio))
            coefficients.pop(partner)

    def o_factor(s, multiple):
        """O_s + multiple g_s(j), unscaled, as (the sum from R's parts, the shift c)."""
        others_sum, shift = sums[s][1]
        if not isinstance(others_sum, exact_sum):  # a constant measured as O_s (_against_reference)
            return others_sum, shift
        hi, _, error, *dot2 = others_sum.args  # dot2: a Dot2 sum's products and its own product's error
        copies = sp.S(multiple) - 1
        if copies.is_Integer and abs(copies) <= 8:  # k g as k terms g: each exact, unlike the product
            own_parts = [sp.sign(copies) * own[s]] * abs(int(copies))
        else:
            own_parts = [copies * own[s]]
        if dot2:
            products, own_error = dot2
            dot2 = [products, -copies * own_error]
        return exact_sum(hi, *own_parts, error, *dot2), shift

    terms, powers = [], set()
    entries = [(c, m, None, 0) for m, c in coefficients.items()] + [(c, m, s, r) for c, m, s, r in grouped]
    for c, monomial, extra, ratio in entries:
        power = [0] * len(rows)
        factors = [c]
        pieces = [(s, k, 0) for s, k in zip(symbols, monomial[:n]) if k] + ([(extra, 1, ratio)] if extra else [])
        for s, k, multiple in pieces:
            o = others[s]
            size = sp.Mul(*(scale[z] ** d for z, d in zip(rows, degree[o])))
            rest, shift = o_factor(s, multiple)
            factors.append((group(rest / size) + (group(shift / size) if shift != 0 else 0)) ** k)
            power = [p + k * d for p, d in zip(power, degree[o])]
        for i, (z, k) in enumerate(zip(rows, monomial[n:])):
            if k:
                factors.append(group(z / scale[z]) ** k)
                power[i] += k
        terms.extend(sp.Add.make_args(sp.expand(sp.Mul(*factors), deep=False)))
        powers.add(tuple(power))
    position = {z: rows.index(alias.get(z, z)) for z in rows}
    folded = set()
    for power in powers:
        merged = [0] * len(rows)
        for z, k in zip(rows, power):
            merged[position[z]] += k
        folded.add(tuple(merged))
    if len(folded) != 1:
        return None
    (power,) = folded
    bounded = sp.Mul(*(group(scale[z] / norm[z]) ** k for z, k in zip(rows, power) if z in norm))
    together = sp.Mul(*(norm[z] ** k for z, k in zip(rows, power) if z in norm)) / denominator
    # the scales of rows that no norm divides (a row below torch's eps) last: a tiny scale
    # times the rest could leave the normal range before the denominator brings it back
    unpaired = sp.Mul(*(scale[z] ** k for z, k in zip(rows, power) if z not in norm))
    return Scaled(tuple(terms), bounded * together, unpaired)


@dataclass(frozen=True)
class Scaled:
    """A quotient in binary scales (:func:`_in_binary_scale`): group(exact_sum(terms) inside) outside."""
    terms: tuple
    inside: sp.Expr
    outside: sp.Expr

    @property
    def expr(self) -> sp.Expr:
        return group(exact_sum(*self.terms) * self.inside) * self.outside

    def map(self, f) -> Scaled:
        return Scaled(tuple(map(f, self.terms)), f(self.inside), f(self.outside))


# Placeholders of the Cauchy-Schwarz gaps: the cosine S/sqrt(A B) of two rows x, y (S = x.y,
# A = P + c, B = Q + d, P = |x|**2, Q = |y|**2, constants c, d >= 0), y written lambda x + r against
# x's largest element (r = 0 there: :func:`reference_reductions`), R = |r|**2 and X = x.r.
_CS_COS, _CS_P, _CS_Q, _CS_R, _CS_X, _CS_C, _CS_D = (
    sp.Symbol(f"_cs_{n}", real=True) for n in ("cos", "P", "Q", "R", "X", "c", "d"))
_CS_A, _CS_B = (sp.Symbol(f"_cs_{n}", positive=True) for n in "AB")

# 1 - cos**2 = (A B - S**2)/(A B). With y = lambda x + r, Q = lambda**2 P + 2 lambda X + R and
# S = lambda P + X, so A B - S**2 = (P R - X**2) + c Q + d A: every multiple of lambda cancels
# exactly (the Lagrange identity |x|**2 |y|**2 - (x.y)**2 = |x|**2 |r|**2 - (x.r)**2). Its terms are
# nonnegative but P R - X**2, which cancels by at most a factor C: it is
# sum_{k < l} (x_k r_l - x_l r_k)**2 >= x_m**2 R >= P R/C, as r_m = 0 at x's largest element m.
# Each product is taken over A B apart (P/A, R/B, X/(sqrt(A) sqrt(B))), so nothing overflows where
# A and B do not. r_k = (x_m y_k - y_m x_k)/x_m, the 2x2 determinant within 2 ulp (Kahan's, with
# fma), so exactly (anti)parallel rows have R = X = 0 and 1 - cos**2 is the eps share
# c Q/(A B) + d/B exactly.
# (each quotient grouped, evaluated on its own)
_CS_SINE_SQUARED = group(_CS_P / _CS_A) * group(_CS_R / _CS_B) \
    - group(group(_CS_X / sp.sqrt(_CS_A)) / sp.sqrt(_CS_B))**2 \
    + group(_CS_C / _CS_A) * group(_CS_Q / _CS_B) + group(_CS_D / _CS_B)

COSINE_NEAR_ONE = sp.S.Half  # beyond it, cos - m is computed from the gap to +-1

# The gaps 1 + sign cos of the Cauchy-Schwarz inequality, keyed by sign, each where it cancels
# (cos near -sign) as (1 - cos**2)/(1 - sign cos), whose denominator is in (3/2, 2] there; elsewhere
# 1 + sign cos, at least 1/2. (Before: sum_k (x_k/sqrt(A) + sign y_k/sqrt(B))**2/2 + c/(2A) + d/(2B),
# a sum of squares that kept the roundings of the unit vectors, 1e-16 per element: relative error
# 1.3 at x = (1, 1.25, 1.5) 1e10, y = 3x, where the gap is the eps share 1e-33.)
# Each entry: (the form where it cancels, where that is, the form elsewhere).
CAUCHY_SCHWARZ_GAPS = {
    -1: (_CS_SINE_SQUARED / (1 + _CS_COS), _CS_COS > COSINE_NEAR_ONE, 1 - _CS_COS),
    1: (_CS_SINE_SQUARED / (1 - _CS_COS), _CS_COS < -COSINE_NEAR_ONE, 1 + _CS_COS),
}


def _cauchy_schwarz_gap(expr: sp.Expr, derivation, held: dict | None = None) -> tuple[sp.Expr, list]:
    """k - k S/sqrt(A B), S = sum(x y), A = sum(x**2) + c and B = sum(y**2) + d with constants
    c, d >= 0: k times the gap of the Cauchy-Schwarz inequality, which cancels where the rows are
    nearly parallel (1 - cos of a similar pair), written as k (1 - cos**2)/(1 + cos) where
    cos > 1/2 (:data:`CAUCHY_SCHWARZ_GAPS`), with A B - S**2 = (P R - X**2) + c Q + d A from y's
    difference r from a multiple of x (y = lambda x + r, R = |r|**2, X = x.r; the Lagrange identity,
    every multiple of lambda cancelled exactly): exactly the constants' share c Q/(A B) + d/B where
    the rows are exactly parallel (r = 0, at any C and norm), where rounded apart 1 - cos is 0 or a
    rounding error, and to the last digits where they are nearly so (r is an exact determinant of
    the elements, not a difference of rounded unit vectors). k + k cos likewise, where cos < -1/2
    (antiparallel rows: the same r, lambda < 0).

    With any other row constant r (a parameter: cos - margin), k cos + r cancels where cos is near
    -r/k, which may be +-1 (margin = 1: the rounded cos reaches 1, where the truth is below it by
    the eps share; margin = -1: cos + 1 near cos = -1). Where cos > 1/2 it is (r + k) - k G-, where
    cos < -1/2 it is (r - k) + k G+, G-+ = 1 -+ cos the gaps above, r + k rounded once (exact where
    it cancels, r = -k, by Sterbenz); between, k cos + r as it is (there a gap would cancel against
    1 instead). A comparison of such a difference with 0 (cos >= margin, also in element
    expressions) is made on the same form, so that the branch it selects agrees with the value.
    With ``held``, each gap is a placeholder there and its form in ``held`` (the later rewrites
    leave it as it is). Returns the expression and the sums it reads."""
    if not isinstance(expr, sp.Expr):
        return expr, []
    moments = {r.symbol: r.summand for r in derivation.reductions if r.kind == "sum"}
    squares = {m.base: sym for sym, m in moments.items() if isinstance(m, sp.Pow) and m.exp == 2
               and m.base in derivation.element_symbols}
    cross = {sym: m.args for sym, m in moments.items() if isinstance(m, sp.Mul) and len(m.args) == 2
             and all(a in squares for a in m.args)}
    row_level = set(moments) | derivation.element_symbols
    found = []

    def shift(total, square):
        rest = sp.expand(total - square)
        ok = not rest.free_symbols & row_level and rest.is_nonnegative
        return rest if ok else None

    def parts(node):
        """(k, r, cos, G) for node = k cos + r, r a row constant, G(sign, guarded) the gap
        1 + sign cos (:data:`CAUCHY_SCHWARZ_GAPS`, recording the sums it reads); else None."""
        if not isinstance(node, sp.Add):
            return None
        for term in node.args:
            for sym, (x, y) in cross.items():
                k = -term / sym
                roots = [p for p in sp.Mul.make_args(k) if isinstance(p, sp.Pow) and p.exp == -sp.S.Half]
                if len(roots) != 1 or sym in k.free_symbols:
                    continue
                (root,) = roots
                coefficient, rest = -k * root ** -1, node - term
                factors = sp.Mul.make_args(root.base)
                if len(factors) != 2:
                    continue
                for a, b in (factors, factors[::-1]):
                    c, d = shift(a, squares[x]), shift(b, squares[y])
                    if c is None or d is None:
                        continue

                    cosine = group(group(sym / sp.sqrt(a)) / sp.sqrt(b))  # A B may overflow where A, B do not

                    def gap(sign, guarded=False, x=x, y=y, a=a, b=b, c=c, d=d, cosine=cosine):
                        """1 + sign cos; ``guarded``: only where the caller has checked that it
                        cancels (cos beyond +-1/2)."""
                        ref = reference_reductions(x, y)
                        found.extend(ref[n] for n in ("max", "xm", "ym", "cross", "square"))
                        values = {_CS_COS: cosine, _CS_P: squares[x], _CS_Q: squares[y],
                                  _CS_R: ref["square"].symbol, _CS_X: ref["cross"].symbol,
                                  _CS_C: c, _CS_D: d, _CS_A: a, _CS_B: b}
                        near, where, elsewhere = (e.xreplace(values) for e in CAUCHY_SCHWARZ_GAPS[sign])
                        form = near if guarded else sp.Piecewise((near, where), (elsewhere, True))
                        if held is None:
                            return form
                        # a placeholder that the later rewrites leave alone: the form is final
                        name = f"_csgap_{'p' if sign > 0 else 'm'}{'_near' if guarded else ''}_{x.name}_{y.name}"
                        placeholder = sp.Symbol(name, nonnegative=True)
                        while held.get(placeholder, form) != form:  # another gap of these rows
                            placeholder = sp.Symbol(placeholder.name + "_", nonnegative=True)
                        held[placeholder] = form
                        return placeholder
                    return coefficient, rest, cosine, gap
        return None

    def rewrite(node):
        found_parts = parts(node)
        if found_parts is None:
            return node
        k, r, cosine, gap = found_parts
        if -k in node.args:  # k cos - k = -k (1 - cos)
            return (r + k) - k * gap(-1)
        if k in node.args:  # k cos + k = k (1 + cos)
            return (r - k) + k * gap(1)
        if not r.free_symbols or (k.free_symbols | r.free_symbols) & row_level:
            return node
        return sp.Piecewise((group(r + k) - k * gap(-1, True), cosine > COSINE_NEAR_ONE),
                            (group(r - k) + k * gap(1, True), cosine < -COSINE_NEAR_ONE), (node, True))

    def compare(node):
        """lhs >= rhs, with lhs - rhs = k cos + r: on the branches of :func:`rewrite`, a comparison
        of k G-+ with r +- k, which no rounding of a difference can turn."""
        if not isinstance(node, (sp.GreaterThan, sp.StrictGreaterThan, sp.LessThan, sp.StrictLessThan)):
            return node
        if varies_along_row(node, derivation.element_symbols):
            return node
        found_parts = parts(node.gts - node.lts)
        if found_parts is None:
            return node
        k, r, cosine, gap = found_parts
        if not r.free_symbols or (k.free_symbols | r.free_symbols) & row_level:
            return node
        strict = isinstance(node, (sp.StrictGreaterThan, sp.StrictLessThan))
        at_most, at_least = (sp.StrictLessThan, sp.StrictGreaterThan) if strict else (sp.LessThan, sp.GreaterThan)
        return sp.Or(sp.And(cosine > COSINE_NEAR_ONE, at_most(k * gap(-1, True), group(r + k))),
                     sp.And(cosine < -COSINE_NEAR_ONE, at_least(k * gap(1, True), group(k - r))),
                     sp.And(cosine <= COSINE_NEAR_ONE, cosine >= -COSINE_NEAR_ONE, node))

    if varies_along_row(expr, derivation.element_symbols):
        return bottom_up(expr, compare), found
    return bottom_up(expr, lambda node: rewrite(compare(node))), found


def stabilise_element(expr: sp.Expr, derivation, pairs=(), singular=()) -> sp.Expr:
    """One element (or row) expression of a row-wise derivation, stabilised; ``pairs`` are its
    close norms (:func:`close_pairs`), ``singular`` its singular takes (:func:`singular_takes`)."""
    held = {}  # placeholder -> an element term that the rewrites must leave as it is
    stable = _stabilise_element(expr, derivation, pairs, singular, held)
    stable = stable.xreplace({s.placeholder: sp.exp(s.rest_weight) for s in singular}).xreplace(held)
    return _one_signed_kept(expr, stable, derivation)


def _one_signed_kept(expr: sp.Expr, stable: sp.Expr, derivation) -> sp.Expr:
    """``expr`` itself where it is a polynomial in the row's inputs that adds terms of one sign
    (:func:`lossgen.fuse_rows.accurate`: a fused sum's summand in its corner form) and ``stable``
    is not: the rewrites' tidying keeps the shortest form, and Jaccard's p (1 - y) + (1 - p) y
    as p + y - 2 p y is 2^-52 for 2^-53 at p = 1, y = 1 - 2^-53 (its loss had relative error 1
    at y = (1 - 2^-53, 1e-300), p = (1, 0))."""
    inputs = derivation.element_symbols
    if stable == expr or not (expr.free_symbols <= inputs and expr.is_polynomial(*inputs)):
        return stable
    unit = unit_inputs(derivation.spec)
    return expr if accurate(expr, unit) and not accurate(stable, unit) else stable


def _stabilise_element(expr: sp.Expr, derivation, pairs, singular, held) -> sp.Expr:
    for pair in pairs:
        form = _close_norm_form(expr, pair, derivation.element_symbols)
        if form is not None:
            return _differences_first(direct_form(form), derivation)
    expr, _ = _cauchy_schwarz_gap(expr, derivation, held)
    expr = _at_index(expr, derivation)
    expr = _own_term_apart(_others_apart(_over_the_rest(expr, singular), derivation), derivation, held)
    expr = _unit_complement(expr, derivation, held)
    for x, u, x_of_u, back, r in _log_weights(derivation):
        if x in expr.free_symbols:
            in_u, placeholders = _simplex_weights(sp.factor_terms(expr.subs(x, x_of_u)), u, back, r, derivation)
            stable = direct_form(_complement_weights(in_u, u)).xreplace(placeholders)
            return _differences_first(stable.subs(u, back), derivation)
    for x, w, x_of_w, back, total in _unit_weights(derivation):
        roots = [p for p in expr.atoms(sp.Pow) if p.base == total and not p.exp.is_integer]
        if x in expr.free_symbols and roots:
            unit = _around_unit(sp.factor_terms(expr.subs(x, x_of_w)), w)
            return _differences_first(direct_form(unit).xreplace({w: back}), derivation)
    weighted, back = _exp_weights(expr, derivation)
    if back:
        return _differences_first(direct_form(sp.factor_terms(weighted)).xreplace(back), derivation)
    expr, less_own = _total_less_own(expr, derivation)
    return _differences_first(direct_form(sp.factor_terms(expr)), derivation).xreplace(less_own)


# --- close norms -----------------------------------------------------------------------------

# Placeholders of the close-norm forms: this element's G = g_j and H = h_j, the norms A = |g|
# and B = |h|, the rests S = A**2 - G**2 and T = B**2 - H**2 (the other elements' squares), their
# difference E = S - T, delta = G - H, sigma = G + H, D = A**2 - B**2 (a fused sum).
_G, _H, _A, _B = (sp.Symbol(f"_close_{n}", positive=n in "AB", real=True) for n in "GHAB")
_S, _T = (sp.Symbol(f"_close_{n}", nonnegative=True) for n in "ST")
_E, _DELTA, _SIGMA, _D = (sp.Symbol(f"_close_{n}", real=True) for n in ("E", "delta", "sigma", "D"))
_A_MINUS_B = _D / (_A + _B)  # A - B, without the cancellation of two close roots

# Expressions of one element that are a difference of one function at the two vectors of a
# close pair (the derivatives of A - B: the unit vectors' difference, and the Hessian's
# diagonal), and the forms that keep their digits, each where it holds (the first condition
# that holds is taken). In the unit vectors' difference G/A - H/B = (G B - H A)/(A B), the
# numerator is (G**2 B**2 - H**2 A**2)/(G B + H A) where G and H have one sign (the sum in the
# denominator then adds), and G**2 B**2 - H**2 A**2 = G**2 T - H**2 S (G**2 H**2 cancels
# exactly); where G and H are also close (|delta| <= |sigma|/2), T = S - E and G**2 - H**2 =
# delta sigma give delta sigma S - G**2 E, whose terms are small where the rows are close. At
# C = 1, S = T = E = 0 exactly: the difference is exactly 0. Where G and H differ in sign,
# G/A - H/B adds. The Hessian's diagonal S/A**3 - T/B**3 is E/B**3 + S (1/A**3 - 1/B**3), the
# second term with A - B = D/(A + B), where E is small against S.
CLOSE_NORM_FORMS = (
    ("unit vectors", _G / _A - _H / _B, sp.Piecewise(
        ((_DELTA * _SIGMA * _S - _G**2 * _E) / ((_G * _B + _H * _A) * _A * _B),
         sp.And(_G * _H > 0, 2 * sp.Abs(_DELTA) <= sp.Abs(_SIGMA))),
        ((_G**2 * _T - _H**2 * _S) / ((_G * _B + _H * _A) * _A * _B), _G * _H > 0),
        (_G / _A - _H / _B, True))),
    ("rests", (_A**2 - _G**2) / _A**3 - (_B**2 - _H**2) / _B**3, sp.Piecewise(
        (_E / _B**3 - _S * _A_MINUS_B * (_A**2 + _A * _B + _B**2) / (_A**3 * _B**3), 2 * sp.Abs(_E) <= _S),
        (_S / _A**3 - _T / _B**3, True))),
    ("rest of g", (_A**2 - _G**2) / _A**3, _S / _A**3),
    ("rest of h", (_B**2 - _H**2) / _B**3, _T / _B**3),
)


@dataclass(frozen=True)
class ClosePair:
    """Two norms A = sqrt(R0), R0 = sum(g**2), and B = sqrt(R1), R1 = sum(h**2), of vectors whose
    difference g - h is shorter than g and h (a shared part cancels: the anchor of a - p and
    a - n), with x and y the elements that g and h are solved for."""

    r0: Reduction
    r1: Reduction
    g: sp.Expr
    h: sp.Expr
    x: sp.Symbol
    y: sp.Symbol
    difference: Reduction       # sum(g**2 - h**2) (or its negative, sign -1), fused
    sign: int
    spread: Reduction           # sum((g - h)**2)

    def solved(self, expr: sp.Expr, g: sp.Symbol, h: sp.Symbol) -> sp.Expr:
        """``expr`` in g and h (symbols) and the norms A and B in place of x, y, R0 and R1."""
        x_of_g = sp.solve(self.g - g, self.x)[0]
        y_of_h = sp.solve(self.h - h, self.y)[0]
        return sp.expand(expr.subs({self.x: x_of_g, self.y: y_of_h})).subs(
            {self.r0.symbol: _A**2, self.r1.symbol: _B**2})

    def values(self) -> dict:
        """What each placeholder stands for, in element expressions and row values."""
        hi0, error0 = sum_parts(self.r0)
        hi1, error1 = sum_parts(self.r1)
        hid, errord = sum_parts(self.difference)
        delta, sigma = sp.expand(self.g - self.h), sp.expand(self.g + self.h)
        return {_G: self.g, _H: self.h, _A: sp.sqrt(self.r0.symbol), _B: sp.sqrt(self.r1.symbol),
                _S: exact_sum(hi0, -self.r0.summand, error0), _T: exact_sum(hi1, -self.r1.summand, error1),
                _E: self.sign * exact_sum(hid, -self.difference.summand, errord),
                _DELTA: delta, _SIGMA: sigma, _D: self.sign * self.difference.symbol}


def _linear_in(expr: sp.Expr, x: sp.Symbol, element_symbols) -> bool:
    slope = sp.diff(expr, x)
    return slope != 0 and not slope.free_symbols & set(element_symbols)


def close_pairs(derivation) -> list[ClosePair]:
    """The close pairs of norms among the reductions (see :class:`ClosePair`): the row program
    of a difference of two norms, A - B (fused by :mod:`lossgen.fuse_rows`)."""
    squares = [r for r in derivation.reductions
               if r.kind == "sum" and isinstance(r.summand, sp.Pow) and r.summand.exp == 2]
    pairs = []
    for r0, r1 in itertools.combinations(squares, 2):
        g, h = r0.summand.base, r1.summand.base
        if not close_summands(g, h):
            continue
        d = sp.expand(g - h)
        only_g = sorted(g.free_symbols & derivation.element_symbols - h.free_symbols, key=sp.default_sort_key)
        only_h = sorted(h.free_symbols & derivation.element_symbols - g.free_symbols, key=sp.default_sort_key)
        if not only_g or not only_h or not _linear_in(g, only_g[0], derivation.element_symbols) \
                or not _linear_in(h, only_h[0], derivation.element_symbols):
            continue
        target = sp.expand(g**2 - h**2)
        difference, sign = None, 1
        for r in derivation.reductions:
            if r.kind == "sum" and sp.expand(r.summand - target) == 0:
                difference, sign = r, 1
            elif r.kind == "sum" and sp.expand(r.summand + target) == 0:
                difference, sign = r, -1
            if difference is not None:
                break
        name = f"{r0.symbol.name}{r1.symbol.name}"
        if difference is None:
            difference = Reduction(sp.Symbol(f"{name}_d", real=True), "sum",
                                   sp.factor_terms(accurate_form(target, frozenset())))
        spread = Reduction(sp.Symbol(f"{name}_q", nonnegative=True), "sum", sp.factor_terms(d**2))
        pairs.append(ClosePair(r0, r1, g, h, only_g[0], only_h[0], difference, sign, spread))
    return pairs


def _close_norm_form(expr: sp.Expr, pair: ClosePair, element_symbols) -> sp.Expr | None:
    """``expr`` as c K(...) for a form K of :data:`CLOSE_NORM_FORMS`, written in that form's
    accurate branches; None where it is no such multiple. Branch by branch of a Piecewise."""
    expr = sp.piecewise_fold(expr)
    if isinstance(expr, sp.Piecewise):
        branches = [(_close_norm_form(e, pair, element_symbols), c) for e, c in expr.args]
        if all(b is None for b, _ in branches):
            return None
        return sp.Piecewise(*[(b if b is not None else e, c) for (b, c), (e, _) in zip(branches, expr.args)])
    if not expr.has(pair.r0.symbol, pair.r1.symbol) or expr == 0:
        return None
    solved = pair.solved(expr, _G, _H)
    canonical = {_G, _H, _A, _B} | set(element_symbols)
    for _, form, stable in CLOSE_NORM_FORMS:
        ratio = sp.cancel(sp.together(solved / form))
        if not ratio.free_symbols & canonical:
            return ratio * stable.xreplace(pair.values())
    return None


def _close_outer(block: HessianBlock, pair: ClosePair, element_symbols) -> HessianBlock:
    """Two outer products of a Hessian block that sum to k (h_j h_l/B**3 - g_j g_l/A**3) (the
    norms' I - w w^T terms of A - B), where the rows are close (|g - h|**2 <= min(A, B)**2/4),
    as k (-(delta_j g_l + h_j delta_l)/A**3 + h_j h_l (A - B)(A**2 + A B + B**2)/(A**3 B**3)),
    delta = g - h, A - B = D/(A + B): exact (g_j g_l = delta_j g_l + h_j delta_l + h_j h_l),
    and its terms are small where g and h are close, where the two outer products, rounded
    apart, cancel to nothing. Elsewhere the outer products as they were."""
    gl, hl = sp.Symbol("_close_Gl", real=True), sp.Symbol("_close_Hl", real=True)
    canonical = {_G, _H, _A, _B, gl, hl} | set(element_symbols)
    target = _H * hl / _B**3 - _G * gl / _A**3
    for (n0, (p0, q0)), (n1, (p1, q1)) in itertools.combinations(enumerate(block.outer), 2):
        total = sp.piecewise_fold(pair.solved(p0, _G, _H) * pair.solved(q0, gl, hl)
                                  + pair.solved(p1, _G, _H) * pair.solved(q1, gl, hl))
        branches = total.args if isinstance(total, sp.Piecewise) else ((total, sp.true),)
        ratios = []
        for e, c in branches:
            ratio = sp.cancel(sp.together(e / target))
            if ratio.free_symbols & canonical:
                break
            ratios.append((ratio, c))
        else:
            k = sp.Piecewise(*ratios) if isinstance(total, sp.Piecewise) else ratios[0][0]
            values = pair.values()
            k = k.xreplace(values)
            g, h, delta = pair.g, pair.h, values[_DELTA]
            a, b = values[_A], values[_B]
            close = 4 * pair.spread.symbol <= sp.Min(pair.r0.symbol, pair.r1.symbol)
            a_minus_b = _A_MINUS_B.xreplace(values)
            new = [(-k * delta / a**3, g), (-k * h / a**3, delta),
                   (k * h * a_minus_b * (a**2 + a * b + b**2) / (a**3 * b**3), h)]
            outer = [(sp.Piecewise((0, close), (p, True)), q) if n in (n0, n1) else (p, q)
                     for n, (p, q) in enumerate(block.outer)]
            outer += [(sp.Piecewise((p, close), (0, True)), q) for p, q in new]
            return HessianBlock(block.diagonal, tuple(outer))
    return block


def _outer_affine(block, element_symbols):
    """Outer products P_a(j) Q_a(l) + P_b(j) Q_b(l) whose Q_a = c Q_b + d (c and d numbers), with
    Q_b (times a row value) a factor of some P of the block, as (c P_a + P_b)(j) Q_b(l) + d P_a(j):
    a symmetric block is a polynomial in the element functions its P's hold, so its entries are
    written in Q_b, not in Q_a and Q_b apart. Soft Jaccard's union and difference have the
    derivatives 1 - y and 1 - 2 y = 2 (1 - y) - 1; its entry (j, l) is then
    -P_1(j) + (2 P_1 + P_2)(j) (1 - y_l), with P_1 = -(1 - y_j)/W**2: at y = (1 - 2**-53, 1 - 2**-53)
    the entry is 2**-53 (2/9)-sized and computed so, where the terms of 1, 1 and y apart, each of
    1/W**2, cancelled to it (relative error 1.25). Exact: only the grouping changes."""
    outer = list(block.outer)
    symbols = sorted(element_symbols, key=sp.default_sort_key)

    def varying_part(q):
        """{monomial in the elements: coefficient} of q's terms that vary along the row."""
        try:
            poly = sp.Poly(sp.expand(q), *symbols)
        except sp.PolynomialError:
            return None
        return {m: c for m, c in poly.terms() if any(m)}

    def divides_a_p(q):
        for p, _ in outer:
            for f in sp.Mul.make_args(sp.factor_terms(p)):
                if varies_along_row(f, element_symbols) and \
                        not varies_along_row(sp.cancel(f / q), element_symbols):
                    return True
        return False

    changed = True
    while changed:
        changed = False
        for a, b in itertools.permutations(range(len(outer)), 2):
            (pa, qa), (pb, qb) = outer[a], outer[b]
            if not varies_along_row(qa, element_symbols) or not varies_along_row(qb, element_symbols):
                continue
            parts_a, parts_b = varying_part(qa), varying_part(qb)
            if not parts_a or parts_b is None or set(parts_a) != set(parts_b):
                continue
            ratios = {sp.cancel(parts_a[m] / parts_b[m]) for m in parts_a}
            if len(ratios) != 1:
                continue
            (c,) = ratios
            d = sp.expand(qa - c * qb)
            if not c.is_Number or not d.is_Number or not divides_a_p(qb):
                continue
            outer[b] = (tidy(c * pa + pb), qb)
            if d != 0:
                outer[a] = (pa, d)
            else:
                del outer[a]
            changed = True
            break
    return HessianBlock(block.diagonal, tuple(outer)) if outer != list(block.outer) else block


def _outer_by_factor(block, element_symbols):
    """The outer products sum_r P_r(j) Q_r(l) of a Hessian block with the terms of the Q_r that
    share one factor of l (softmax_l = exp(s_l - R)) taken together: sum_r P_r(j) c_r F(l) is
    (sum_r c_r P_r(j)) F(l), and that coefficient is stabilised as one expression of j. Rounded
    apart, the terms cancel: the focal loss's entry (y, l) is p_l (-A'(u_y) + A'(u_y) p_y + ...),
    with A'(u_y) (1 - p_y) what remains where p_y is close to 1. Exact: only the grouping changes,
    and only factors that several Q_r share are taken out."""
    def parts(term):
        factors = sp.Mul.make_args(term)
        varying = [f for f in factors if varies_along_row(f, element_symbols)]
        return sp.Mul(*[f for f in factors if f not in varying]), sp.Mul(*varying)

    def terms(q):
        """q's terms; a row value c of c (a + b) distributed over them (Poly-1 over a temperature:
        (onehot(y) - p_l)/T shares p_l with p_l/T). Not a number: distributing Dice's 2 (p - y)
        regrouped its product's and the triplet loss's factors, accurate as they were."""
        factors = sp.Mul.make_args(q)
        sums = [f for f in factors if isinstance(f, sp.Add)]
        c = sp.Mul(*[f for f in factors if f is not sums[0]]) if len(sums) == 1 else sp.S.One
        if len(sums) == 1 and not c.is_Number and not varies_along_row(c, element_symbols):
            return [c * t for t in sums[0].args]
        return sp.Add.make_args(q)

    split = [[parts(term) for term in terms(q)] for _, q in block.outer]
    owners = {}
    for n, terms in enumerate(split):
        for _, factor in terms:
            owners.setdefault(factor, set()).add(n)
    shared = [f for f, n in owners.items() if len(n) > 1 and f != 1]
    if not shared:
        return block
    outer = []
    for (p, _), terms in zip(block.outer, split):
        rest = sp.Add(*[c * f for c, f in terms if f not in shared])
        if rest != 0:
            outer.append((p, rest))
    for factor in sorted(shared, key=sp.default_sort_key):
        coefficient = sp.Add(*[c * p for (p, _), terms in zip(block.outer, split) for c, f in terms if f == factor])
        outer.append((tidy(coefficient), factor))
    return HessianBlock(block.diagonal, tuple(outer))


def stabilise_rows(derivation):
    """Every summand, loss and derivative of a row-wise derivation, stabilised (no asymptotic
    branch: a row holds several residuals at once); the outer products of the Hessian's blocks
    grouped by their shared factors first (:func:`_outer_by_factor`)."""
    pairs = close_pairs(derivation)
    blocks = {k: _outer_by_factor(_outer_affine(b, derivation.element_symbols), derivation.element_symbols)
              for k, b in derivation.blocks.items()}
    for pair in pairs:
        blocks = {k: _close_outer(b, pair, derivation.element_symbols) for k, b in blocks.items()}
    derivation = replace(derivation, blocks=blocks)
    singular = singular_takes(derivation)
    stable = derivation.map(lambda e: stabilise_element(e, derivation, pairs, singular))
    # the weight sums that _simplex_weights read, and the close pairs' sums, as reductions of
    # their own (where the program does not have them)
    used = set().union(*(e.free_symbols for e in _expressions(stable)))
    sums = [weight_sum(r) for r in derivation.reductions if r.kind == "logsumexp"]
    # and the top two classes that tie_difference reads
    sums += [q for r in derivation.reductions if r.kind == "logsumexp" for q in top_two(r)]
    sums += [replace(r, summand=stabilise_element(r.summand, derivation)) for pair in pairs
             for r in (pair.difference, pair.spread) if r not in derivation.reductions]
    sums = [s for s in sums if used & {s.symbol, *sum_parts(s), error_tail(s)}]
    # the singular takes' scaled values and the logsumexps over the other classes they meet
    sums += [replace(s.scaled, summand=stabilise_element(s.scaled.summand, derivation))
             for s in singular if s.scaled.symbol in used]
    sums += [s.rest for s in singular if s.rest.symbol in used]
    # the rows' scales that _in_binary_scale reads, likewise
    axis = [derivation.spec.symbols[i.name] for i in derivation.spec.inputs if i.axis]
    sums += [scale_sum(z) for z in axis if scale_sum(z).symbol in used]
    rows = [z for z in axis if not any(i.shared for i in derivation.spec.inputs if i.name == z.name)]
    for x, y in itertools.permutations(rows, 2):
        parts = reference_reductions(x, y)
        read = [r for r in (parts["cross"], parts["magnitude"], parts["square"]) if used & {r.symbol, *sum_parts(r)}]
        if read:
            sums += [parts["max"], parts["xm"], parts["ym"], *read]
    sums = list({s.symbol: s for s in sums}.values())
    stable, zero_tests = at_zero_norm(derivation, stable)
    sums += zero_tests
    stable = replace(stable, reductions=stable.reductions + tuple(sums)) if sums else stable
    with spec_domains(derivation.spec):
        stable = stable.map(apply_last)
    return exact_sums(product_errors(scaled_norms(derivation, mean_residuals(stable))))


# --- the rounding of a row's mean ------------------------------------------------------------

def _mean_residual(r: Reduction, sums: dict, element_symbols) -> tuple[sp.Expr, sp.Symbol] | None:
    """r = sum_k a (g_k - R/C), R = sum_k g_k another sum and a a row value, as
    a (R - C fl(R/C)), with R from its two parts (:func:`sum_parts`): fma(-C, R/C, hi) + error,
    exact. In exact arithmetic it is 0; in the kernels it is what the rounded mean fl(R/C) misses,
    and g_j - fl(R/C) + r/(a C) is g_j's deviation from the mean: the chain rule through a mean
    inside a sum (a variance's) leaves it (global SSIM's y_j - mu_y). Summed over the row, each
    term a (g_k - fl(R/C)) was rounded (a = -1/C: y = (1e-300, 0.5, 1 - 2^-53) gave 2.8e-17 for
    2^-53/3, and the Hessian relative error 1.3e-11). Returns (that value, R)."""
    summand = in_exact_arithmetic(r.summand)
    for total in sorted(summand.free_symbols & set(sums), key=sp.default_sort_key):
        a = sp.simplify(-ROW_SIZE * sp.diff(summand, total))
        if a == 0 or a.free_symbols & element_symbols:
            continue
        g = in_exact_arithmetic(sums[total].summand)
        if sp.expand(summand - a * (g - total / ROW_SIZE)) == 0:
            hi, error = sum_parts(sums[total])
            return a * (fma(-ROW_SIZE, total / ROW_SIZE, hi) + error), total
    return None


def _from_rounded_means(expr: sp.Expr, means: dict, element_symbols) -> sp.Expr:
    """``expr`` with each k C g - k R (``means``: {R: g}, R = sum_k g_k) as k C (g - fl(R/C)):
    an element's deviation from the mean that the residual of :func:`_mean_residual` corrects
    (tidied, 2 (g - R/C) is 2 (C g - R)/C, whose C g is rounded by as much as the residual)."""
    def rewrite(e):
        if not isinstance(e, sp.Add):
            return e
        terms = list(e.args)
        # matched on the terms' factors, not by cancelling quotients: global SSIM's Hessian has
        # thousands of sums (sympy.cancel on each took 21 s of its 27 s of stabilisation)
        factors = [sp.Mul.make_args(t) for t in terms]
        for total, summand in means.items():
            if not any(total in f for f in factors):
                continue
            for t, t_factors in zip(terms, factors):
                for g in (summand, group(summand)):  # as the sum's loop computes it, or as written
                    if g not in t_factors:
                        continue
                    k = t / (ROW_SIZE * g)
                    if k.free_symbols & (element_symbols | {total}) or -k * total not in terms:
                        continue
                    kept = [u for u in terms if u not in (t, -k * total)]
                    return sp.Add(*kept, k * ROW_SIZE * (g - group(total / ROW_SIZE)))
        return e
    return bottom_up(expr, rewrite)


def mean_residuals(stable):
    """``stable`` with each sum of deviations from a mean (:func:`_mean_residual`) a row value:
    no pass over the row, and exact; the deviations it corrects from the rounded mean
    (:func:`_from_rounded_means`)."""
    sums = {r.symbol: r for r in stable.reductions if r.kind == "sum"}
    found, means = {}, {}
    for r in sums.values():
        residual = _mean_residual(r, sums, stable.element_symbols)
        if residual is not None:
            found[r.symbol], total = residual
            means[total] = sums[total].summand
    if not found:
        return stable
    rest = tuple(r for r in stable.reductions if r.symbol not in found)
    if any(r.summand.free_symbols & set(found) for r in rest):
        return stable

    def transform(e):
        return _from_rounded_means(e.xreplace(found), means, stable.element_symbols)
    return replace(stable.map(transform), reductions=rest)


# --- sums of products that keep each product's rounding error --------------------------------

def _two_factors(summand: sp.Expr, inputs) -> tuple | None:
    """(a, b) where ``summand`` is the product a*b of two of the row's ``inputs``, else None."""
    if isinstance(summand, sp.Mul) and len(summand.args) == 2 and all(a in inputs for a in summand.args):
        return summand.args
    return None


def products_part(r: Reduction) -> sp.Symbol:
    """The third part of a Dot2 sum (:func:`product_errors`): its products' rounding errors."""
    return sp.Symbol(f"{r.symbol.name}_products", real=True)


def dot2_factors(r: Reduction, ranges: dict) -> tuple | None:
    """(a, b) where ``r`` sums products a b of two row inputs that may change sign along the
    row: a sum that keeps its products' errors (:func:`product_errors`), else None."""
    factors = _two_factors(r.summand, set(ranges)) if r.kind == "sum" else None
    return None if factors is None or nonnegative_on(r.summand, ranges) else factors


def product_errors(stable):
    """The sums R = sum_k a_k b_k of products of two inputs whose sign may change along the row
    (x.y), which the kernels sum with each product's rounding error, fma(a, b, -a b), in an error
    part of its own (Ogita, Rump and Oishi's Dot2; emit_rows.LOOP_CODE "sum_products"): their
    compensated sums add products that are already rounded, so x.y kept only the digits of its
    terms where it cancels between elements (x.y = -3.1e-7 where the rounded products sum to
    1e-290, at x = (-1, -1e10 (1 + 2^-52), 1 + 2^-52, 1e-8, -1e10), y = (1e-300, -1, -1e10,
    1e-300, -1e-300)). R's parts (hi and the additions' errors) stay what they were: the forms
    that take an element's own term out of R from them (exact_sum(R_hi, -a b, R_error)) would
    lose their exactness to the products' errors (800 beside errors of 1e26 at x1 = (-1e50, 20),
    x2 = (1e-8, 40)). Sums that a scaled norm sums again, of squares and of products of one sign
    are left as they were."""
    ranges = axis_ranges(stable.spec)
    rescaled = {n.reduction.symbol for n in stable.scaled if isinstance(n, ScaledNorm)}
    rescaled |= {r.symbol for n in stable.scaled if isinstance(n, ScaledPair) for r, _ in n.sums}
    products = {}
    read = set().union(*(e.free_symbols for e in _expressions(stable)))
    for r in stable.reductions:
        factors = dot2_factors(r, ranges)
        if factors is not None and r.symbol in rescaled:
            assert products_part(r) not in read, f"{r.symbol} is summed again by a scaled norm"
        elif factors is not None:
            products[r.symbol] = factors
    return replace(stable, products=products) if products else stable


def exact_sums(stable):
    """The sums R = sum_k g_k whose terms may take both signs on the inputs' domains and whose
    summand is a polynomial with integer coefficients in the row's inputs and the parameters (in
    exact arithmetic): where R cancels below a fraction of sum_k |g_k| (emit_rows.EXACT_SUM), the
    kernels evaluate it again exactly, each monomial split exactly and summed as an expansion
    (lossgen/exact_rows.py), and keep it as a double-double. The compensated sum adds terms that
    are already rounded (g_k of a few operations), so where R cancels it holds only the digits of
    its terms: the triplet loss's d(a, p)**2 - d(a, n)**2 = sum_k (n_k - p_k)(2 a_k - p_k - n_k + 2 eps)
    is 2e53 at p_5 = -1e50 against n_0 = 1e50 (C = 7), from terms of 1e100 each rounded by up to
    1e84 (the loss had relative error 0.98 there). A sum of products that keeps its products'
    errors (:func:`product_errors`) is accurate itself, but its parts, from which forms take an
    element's own term, are not: it is taken again where the products' errors are not small
    against it."""
    spec = stable.spec
    ranges = axis_ranges(spec)
    generators = sorted({spec.symbols[i.name] for i in spec.inputs if i.axis}, key=sp.default_sort_key)
    generators += sorted((spec.symbols[p.name] for p in spec.params), key=sp.default_sort_key)
    exact = {}
    for r in stable.reductions:
        if r.kind != "sum":
            continue
        summand = in_exact_arithmetic(r.summand)
        terms = monomials(summand, generators)
        if terms is not None and not (nonnegative_on(summand, ranges) or nonnegative_on(-summand, ranges)):
            exact[r.symbol] = terms  # terms of both signs
    return replace(stable, exact=exact) if exact else stable


# --- a norm at 0 -------------------------------------------------------------------------------

def _negative_powers(expr: sp.Expr, base: sp.Symbol) -> bool:
    return any(p.base == base and p.exp.is_negative for p in expr.atoms(sp.Pow))


def zero_norms(derivation) -> list[Reduction]:
    """The sums of squares S = sum(g**2) (a norm's square) that the loss and the summands read
    only through powers of nonnegative exponent (the norm sqrt(S), S itself): at S = 0 the loss is
    finite, and the norm has a kink there, not a pole."""
    read = [derivation.loss, *(r.summand for r in derivation.reductions)]
    return [r for r in derivation.reductions
            if r.kind == "sum" and isinstance(r.summand, sp.Pow) and r.summand.exp == 2
            and not any(_negative_powers(e, r.symbol) for e in read)]


def zero_test(r: Reduction) -> Reduction:
    """sum_k |g_k| for S = sum(g**2): 0 exactly where g is the zero vector, unlike S, which is 0
    where every g_k**2 underflows (|g_k| < 1.5e-162) as well."""
    return Reduction(sp.Symbol(f"{r.symbol.name}_l1", nonnegative=True), "sum", sp.Abs(r.summand.base))


def at_zero_norm(derivation, stable):
    """The derivatives at a norm of 0, by the almost-everywhere convention (sign(0) = 0, the
    Dirac terms dropped: :func:`lossgen.derive.almost_everywhere`) generalised to rows: every
    product with a negative power of a sum of squares S = sum(g**2) of :func:`zero_norms` is 0
    where g is the zero vector (:func:`zero_test`; as a whole, so that a quotient stays one
    quotient), so the unit vector g/sqrt(S) is 0 there (sign(g) at C = 1) and so is every term
    of its derivative ((I - w w^T)/sqrt(S)), where the kernels computed 0/0 (nan): the Hessian of
    |x1 - x2|**2/2 at x1 = x2, I, was nan through a factor 0 (the other branch of a selection)
    times 0/0. A tiny g whose squares underflow (S = 0, g not 0) is left as it was. The loss and
    the summands are left as they are. Returns the stabilised derivation and the zero tests'
    reductions that it reads."""
    tests = {r.symbol: zero_test(r) for r in zero_norms(derivation)}
    if not tests:
        return stable, []

    def convention(expr):
        if not isinstance(expr, sp.Basic) or not expr.args:
            return expr
        if isinstance(expr, (sp.Mul, sp.Pow)):
            bases = sorted({f.base for f in sp.Mul.make_args(expr) if isinstance(f, sp.Pow)
                            and f.base in tests and f.exp.is_negative}, key=sp.default_sort_key)
            if bases:  # the whole product, so that a quotient stays one quotient
                inner = expr.func(*(a if isinstance(a, sp.Pow) and a.base in bases else convention(a)
                                    for a in expr.args))
                return sp.Piecewise((inner, sp.And(*(tests[b].symbol > 0 for b in bases))), (0, True))
        return expr.func(*map(convention, expr.args))

    stable = replace(stable, grad=tuple(map(convention, stable.grad)), hess=tuple(map(convention, stable.hess)),
                     blocks={k: HessianBlock(convention(b.diagonal),
                                             tuple((convention(p), convention(q)) for p, q in b.outer))
                             for k, b in stable.blocks.items()},
                     cross={k: convention(e) for k, e in stable.cross.items()})
    used = set().union(*(e.free_symbols for e in _expressions(stable)))
    return stable, [t for t in tests.values() if t.symbol in used]


# --- norms in a binary scale ------------------------------------------------------------------

# The range of a sum of squares S = sum(g**2) in which the kernels use it as computed: 2**-600 to
# 2**600, far from underflow (a difference |g_k| < 1.5e-162 squares to 0) and overflow (|g_k| >
# 1.3e154 squares to inf), so that S**(3/2), S**2 and their reciprocals stay normal floats too.
SAFE_SQUARES = (2.0**-600, 2.0**600)


@dataclass(frozen=True)
class ScaledNorm:
    """A norm sqrt(R), R = sum(g**2), computed in a binary scale P (a power of two, 1 where R is
    in :data:`SAFE_SQUARES`): R = P**2 R^, g = P g^ with g^ = g/P exactly (the emitter's redo of
    the row's sum, emit_rows)."""

    reduction: Reduction
    g: sp.Expr            # the vector's element, as the reduction's loop computes it
    scale: sp.Symbol      # P
    inverse: sp.Symbol    # 1/P
    exponent: sp.Symbol   # e, P = 2**e


@dataclass(frozen=True)
class ScaledPair:
    """The values of a close pair of scaled norms (:class:`ClosePair`) that mix the two vectors:
    delta = g - h and sigma = g + h, and the sums D = sum(g**2 - h**2) and sum((g - h)**2), measured
    in the larger of the two norms' scales, Q = 2**max(e_g, e_h) (e = 0 for a norm in range):
    the kernels sum D and the spread again over their factors times 1/Q where Q is not 1."""

    norms: tuple          # (ScaledNorm, ScaledNorm)
    sums: tuple           # (Reduction, its summand with each linear factor times 1/Q)
    vectors: tuple        # delta and sigma, plain
    scale: sp.Symbol
    inverse: sp.Symbol
    exponent: sp.Symbol
    # each norm's scale as Q rho, rho = 2**(e - max(e_g, e_h)) <= 1: sums of terms in both norms
    # (A**2 + A B + B**2) then share the factor Q**k, and comparisons cancel it
    ratios: tuple = ()            # (rho_g, rho_h)
    ratio_exponents: tuple = ()   # their exponents


def _scaled_summand(summand: sp.Expr, inverse: sp.Symbol, element) -> sp.Expr | None:
    """A second moment's summand (a square, or a product of two factors that vary along the row,
    each linear in the elements) with each factor times ``inverse``; None for another form."""
    if isinstance(summand, sp.Pow) and summand.exp == 2:
        return in_scale(summand.base, inverse)**2
    factors = sp.Mul.make_args(summand)
    varying = [f for f in factors if f.free_symbols & set(element)]
    if len(varying) != 2 or len(set(varying)) != 2:
        return None
    return sp.Mul(*(in_scale(f, inverse) if f in varying else f for f in factors))


def _private_symbol(g: sp.Expr, element_symbols) -> tuple[sp.Symbol, sp.Expr] | None:
    """An element symbol x of g with a numeric slope dg/dx, and that slope."""
    for x in sorted(g.free_symbols & set(element_symbols), key=sp.default_sort_key):
        slope = sp.diff(g, x)
        if slope.is_Number and slope != 0:
            return x, slope
    return None


def _plain(node: sp.Expr) -> sp.Expr:
    """``node`` with its exact sums and groups as plain sums (the value they stand for)."""
    return node.replace(lambda e: isinstance(e, (exact_sum, group)), lambda e: sp.Add(*e.args))


def _in_scale(expr, norms: list, plain_g: dict):
    """Every multiple k g of a norm's vector (a sum, an exact sum or a group: the vector as the
    derivatives hold it) as k P g^, outermost first."""
    if not isinstance(expr, sp.Basic) or not expr.args:
        return expr
    if isinstance(expr, (sp.Add, exact_sum, group)) and not isinstance(expr, real_group):
        plain = sp.expand(_plain(expr))
        for n in norms:
            x, slope, g = plain_g[n]
            if not plain.free_symbols <= g.free_symbols:
                continue
            k = sp.diff(plain, x) / slope
            if k.is_Number and k != 0 and sp.expand(plain - k * g) == 0:
                # g as this node computes it (so that where P = 1 the value is the one before)
                return k * n.scale * in_scale(expr / k, n.inverse)
    return expr.func(*(_in_scale(a, norms, plain_g) for a in expr.args))


def _scale_power(term: sp.Expr, p: sp.Symbol):
    """The exponent of P in the product ``term``."""
    return sp.Add(*(f.exp if isinstance(f, sp.Pow) and f.base == p else 1 if f == p else 0
                    for f in sp.Mul.make_args(term)))


def _collect_scales(expr, scales: list):
    """Each power of a scale P common to every term of a sum (exact or plain) taken out of it, and
    cancelled between the two sides of a comparison (P > 0): the scaled terms of S = R - g_j**2,
    P**2 (R^ - g^_j**2), are then summed in the scale, and the products of the scaled values collect
    P once (a division by a power of two)."""
    if not isinstance(expr, sp.Basic) or not expr.args:
        return expr
    expr = expr.func(*(_collect_scales(a, scales) for a in expr.args))
    if isinstance(expr, (sp.Add, exact_sum)):
        terms = expr.args
        for p in scales:
            powers = [_net_power(t, p) for t in terms]
            if not all(k is not None and k.is_Number for k in powers):
                continue
            if all(k > 0 for k in powers) or all(k < 0 for k in powers):
                k = min(powers) if powers[0] > 0 else max(powers)
                inner = expr.func(*(_push_scale(t, p, -k) for t in terms))
                return p**k * _collect_scales(inner, scales)
    if isinstance(expr, sp.core.relational.Relational) and not isinstance(expr, (sp.Eq, sp.Ne)):
        lhs, rhs = expr.lhs, expr.rhs
        for p in scales:
            a, b = _scale_power(lhs, p), _scale_power(rhs, p)
            if rhs == 0:
                b = a
            if a.is_Number and b.is_Number and a != 0 and (a > 0) == (b > 0):
                k = min(a, b) if a > 0 else max(a, b)
                lhs, rhs = lhs / p**k, rhs / p**k
        return expr.func(lhs, rhs)
    return expr


def _push_scale(expr, p: sp.Symbol, k):
    """expr p**k, the power (and a product's own powers of p) taken into the branches of its
    selection, where the branch's own powers of p combine with it, rather than left outside,
    where p**k alone may overflow."""
    if expr == 0:
        return expr
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*((_push_scale(e, p, k), c) for e, c in expr.args)) if k != 0 else expr
    if isinstance(expr, sp.Mul):
        factors = sp.Mul.make_args(expr)
        selections = [f for f in factors if isinstance(f, sp.Piecewise)]
        own = _scale_power(expr, p)
        if selections and own.is_Number and k + own != 0:
            rest = [f for f in factors
                    if f is not selections[0] and not (f == p or isinstance(f, sp.Pow) and f.base == p)]
            return sp.Mul(*rest, _push_scale(selections[0], p, k + own))
    return expr * p**k


def _net_power(expr, p: sp.Symbol):
    """The power of p that ``expr`` carries as a factor (into selections whose nonzero branches
    agree), None where its terms differ."""
    if expr == 0:
        return None
    if isinstance(expr, sp.Piecewise):
        powers = {_net_power(e, p) for e, _ in expr.args if e != 0}
        return powers.pop() if len(powers) == 1 else None
    if isinstance(expr, sp.Mul):
        total = sp.S.Zero
        for f in expr.args:
            k = _net_power(f, p) if isinstance(f, sp.Piecewise) else _scale_power(f, p)
            if k is None or not k.is_Number:
                return None
            total += k
        return total
    if isinstance(expr, sp.Pow) and expr.base == p:
        return expr.exp
    if expr == p:
        return sp.S.One
    if isinstance(expr, (sp.Add, exact_sum)):
        powers = {_net_power(t, p) for t in expr.args}
        return powers.pop() if len(powers) == 1 else None
    return sp.S.Zero


def _balanced(pair, scales):
    """An outer product P(j) Q(l) with Q's powers of each scale moved into P, whose own powers
    they cancel (the norm's (-m/(2 R**(3/2))) g_j times g_l: P**-2 and P apart, P**-1 together)."""
    left, right = pair
    for s in scales:
        k = _net_power(right, s)
        if k is not None and k != 0:
            left, right = _push_scale(left, s, k), _push_scale(right, s, -k)
    return left, right


def _as_exponents(expr, exponents: dict):
    """Every product's powers of the scales P = 2**e as one two_scaled(rest, sum k e): x 2**n by
    ldexp, where P**k alone would underflow or overflow (P**3 at P = 2**-996)."""
    if not isinstance(expr, sp.Basic) or not expr.args:
        if expr in exponents:
            return two_scaled(sp.S.One, exponents[expr])
        return expr
    if isinstance(expr, sp.Pow) and expr.base in exponents:
        return two_scaled(sp.S.One, expr.exp * exponents[expr.base])
    if isinstance(expr, sp.Mul):
        shift, rest = sp.S.Zero, []
        for f in expr.args:
            if f in exponents:
                shift += exponents[f]
            elif isinstance(f, sp.Pow) and f.base in exponents:
                shift += f.exp * exponents[f.base]
            else:
                rest.append(_as_exponents(f, exponents))
        if shift != 0:
            return two_scaled(sp.Mul(*rest), shift)
        return sp.Mul(*rest)
    return expr.func(*(_as_exponents(a, exponents) for a in expr.args))


def scaled_norms(derivation, stable):
    """The norms sqrt(R), R = sum(g**2), of :func:`zero_norms` that the loss reads as norms
    (distances: the loss reads R only through nonnegative powers, sqrt(R) among them) computed so that neither R nor the derivatives' powers of it
    underflow or overflow: the kernels sum g**2 as before and, only for a row whose R falls outside
    :data:`SAFE_SQUARES` (0 where the squares underflow, inf where they overflow), sum it again over
    g/P, P the power of two of the row's largest |g_k| (exact scaling); the derivatives read
    R = P**2 R^ and g = P g^, every multiple of the vector written k P g^, and each sum's common
    power of P taken out, so that u = g/|g| is g^/sqrt(R^) and the Hessian's (R - g_j**2)/R**(3/2)
    is (R^ - g^_j**2)/(P R^**(3/2)). Where R is in range P = 1 and every value is the one
    computed before. A norm whose vector has no element symbol of numeric slope, or whose R a
    reduction's summand reads, stays as it was."""
    element = derivation.element_symbols
    summands = {r.symbol: r.summand for r in stable.reductions}
    read = set().union(*(r.summand.free_symbols for r in stable.reductions))
    norms, plain_g = [], {}
    roots = {p.base for p in derivation.loss.atoms(sp.Pow) if p.exp == sp.S.Half}
    for r in zero_norms(derivation):
        if r.symbol not in roots or read & {r.symbol, *sum_parts(r)}:
            continue  # a sum of squares that the loss does not read as a norm (Dice's sum(p**2))
        summand = summands.get(r.symbol, r.summand)
        g = summand.base if isinstance(summand, sp.Pow) and summand.exp == 2 else r.summand.base
        private = _private_symbol(sp.expand(r.summand.base), element)
        if private is None:
            continue
        n = ScaledNorm(r, g, sp.Symbol(f"{r.symbol.name}_P", positive=True),
                       sp.Symbol(f"{r.symbol.name}_Pinv", positive=True), sp.Symbol(f"{r.symbol.name}_e", integer=True))
        norms.append(n)
        plain_g[n] = (*private, sp.expand(r.summand.base))
    if not norms:
        return stable
    values = {}
    for n in norms:
        hi, error = sum_parts(n.reduction)
        values.update({s: n.scale**2 * s for s in (n.reduction.symbol, hi, error)})
    scales = [n.scale for n in norms]
    by_reduction = {n.reduction.symbol: n for n in norms}
    matched = list(norms)  # what _in_scale writes in a scale: the norms' vectors, the pairs' delta, sigma
    pairs, ratio_of = [], {}
    for pair in close_pairs(derivation):
        if pair.r0.symbol not in by_reduction or pair.r1.symbol not in by_reduction:
            continue
        name = f"{pair.r0.symbol.name}{pair.r1.symbol.name}"
        scale, inverse = sp.Symbol(f"{name}_P", positive=True), sp.Symbol(f"{name}_Pinv", positive=True)
        sums, ok = [], True
        for r in (pair.difference, pair.spread):
            if read & {r.symbol, *sum_parts(r)}:
                ok = False
            if r.symbol in summands:
                scaled = _scaled_summand(summands[r.symbol], inverse, element)
                ok = ok and scaled is not None
                sums.append((replace(r, summand=summands[r.symbol]), scaled))
        if not ok:
            continue
        delta, sigma = sp.expand(pair.g - pair.h), sp.expand(pair.g + pair.h)
        if any(by_reduction[r.symbol].scale in ratio_of for r in (pair.r0, pair.r1)):
            continue  # a norm of two pairs: in the first one's scale
        ratios = tuple(sp.Symbol(f"{r.symbol.name}_rho", positive=True) for r in (pair.r0, pair.r1))
        scaled_pair = ScaledPair((by_reduction[pair.r0.symbol], by_reduction[pair.r1.symbol]), tuple(sums),
                                 (delta, sigma), scale, inverse, sp.Symbol(f"{name}_e", integer=True), ratios,
                                 tuple(sp.Symbol(f"{r.name}_e", integer=True) for r in ratios))
        for n, rho in zip(scaled_pair.norms, ratios):
            ratio_of[n.scale] = scale * rho
        pairs.append(scaled_pair)
        for r, _ in sums:
            hi, error = sum_parts(r)
            values.update({s: scale**2 * s for s in (r.symbol, hi, error)})
        for vector in (delta, sigma):
            private = _private_symbol(vector, element)
            if private is None:
                continue
            twin = ScaledNorm(pair.r0, vector, scale, inverse, scaled_pair.exponent)
            matched.append(twin)
            plain_g[twin] = (*private, vector)
        scales.append(scale)
    scales = [s for s in scales if s not in ratio_of] + [r for p in pairs for r in p.ratios]

    exponents = {n.scale: n.exponent for n in norms}
    exponents.update({p.scale: p.exponent for p in pairs})
    exponents.update({r: e for p in pairs for r, e in zip(p.ratios, p.ratio_exponents)})

    def pushed(expr):
        for s in scales:  # each product's power of P into its selections
            expr = expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.Piecewise) and e.has(s),
                                lambda e: _push_scale(e, s, 0))
        return expr

    def transform(expr):
        expr = _in_scale(expr, matched, plain_g).xreplace(values).xreplace(ratio_of)
        return pushed(_collect_scales(pushed(expr), scales))

    def finish(expr):
        return _as_exponents(expr, exponents)

    blocks = {k: HessianBlock(transform(b.diagonal),
                              tuple(_balanced((transform(p), transform(q)), scales) for p, q in b.outer))
              for k, b in stable.blocks.items()}
    return replace(stable, loss=finish(transform(stable.loss)), grad=tuple(finish(transform(e)) for e in stable.grad),
                   hess=tuple(finish(transform(e)) for e in stable.hess),
                   blocks={k: HessianBlock(finish(b.diagonal), tuple((finish(p), finish(q)) for p, q in b.outer))
                           for k, b in blocks.items()},
                   cross={k: finish(transform(e)) for k, e in stable.cross.items()},
                   scaled=tuple(norms) + tuple(pairs))


def _expressions(derivation) -> list[sp.Expr]:
    """Every expression of a row derivation: summands, loss, derivatives, Hessian blocks."""
    return [*(r.summand for r in derivation.reductions), derivation.loss, *derivation.grad, *derivation.hess,
            *(e for b in derivation.blocks.values() for e in (b.diagonal, *(x for pq in b.outer for x in pq))),
            *derivation.cross.values()]
