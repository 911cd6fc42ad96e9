"""Stage 3, stabilise: rewrite expressions into forms that floating point evaluates accurately.

This module is the only place where numerical-stability knowledge lives, as four tables;
every rewrite holds exactly in real arithmetic.

* ``RULES``: local rewrites ``find -> replace`` (log(1 + x) -> log1p(x), ...), applied
  bottom-up in table order until nothing changes. A rule may use the inputs and parameters
  that the spec puts in [0, 1] (``unit_interval``, set by ``stabilise_derivation``).
* ``LAST_RULES``: rewrites applied once to each finished output, outermost match first
  (``apply_last``): rule parameter_first, c*X with c a parameter that may be 0 and X a power
  that can overflow -> finite_or(c*X, (c*w)*w), the second only where the first is inf or
  nan (0*inf at c = 0, where the truth is 0).
* ``SPLITS``: cancellation in sums that no local rule sees, such as softplus(x) - y*x at
  y = 1, x = 40 (the true value is 4.2e-18). On each branch of its argument a function is
  written as an exact "big" part plus a small remainder (softplus(x) = x + softplus(-x) for
  x > 1); in the sum, the big parts combine symbolically with the other terms into one
  group that is evaluated first ((1 - y)*x = 0 exactly), and the small parts are added last;
  big parts under a common factor F are grouped the same way, F*(1 - y). Every split of the
  same argument applies at once (softplus(x) and sigmoid(x) in one sum).
* Asymptotic inversion (``HUGE``): for a residual-like variable v, the expression is
  rewritten exactly in t = 1/v and used where |v| > HUGE, so that v**2 never overflows
  (2 v/(1 + v**2) -> 2 t/(t**2 + 1)). It is kept only when no power of 1/t remains. A
  symbolic power B**k of a huge B is exp(k log B), log B a sum of logs of B's factors, with
  the powers of t taken into the exponent (Barron's ((x/c)**2/|alpha - 2| + 1)**(alpha/2)).
  Taken apart, log(1 + 1/w) = log1p(w) - log(w) cancels where w is large: the inverted form
  holds only where every such |w| <= 1, and the direct form is used elsewhere.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import product
from typing import Callable, Optional

import sympy as sp
from mpmath import iv
from sympy.codegen.cfunctions import expm1, hypot, log1p
from sympy.core.traversal import bottom_up

from dataclasses import replace

from .derive import differentiate, tidy
from .reductions import ROW_SIZE
from .domains import DOMAINS
from .vocabulary import (exact_sum, exprel, finite_or, fma, group, log1prel, logaddexp, logcosh, real_group, sigmoid, softplus,
                         xlog1py, xlogy)

Rewrite = Callable[[sp.Expr], Optional[sp.Expr]]  # the replacement, or None when no match


@dataclass(frozen=True)
class Rule:
    name: str
    find: str       # the pattern, as a reader would write it
    replace: str
    reason: str
    rewrite: Rewrite


def _add_terms(expr):
    return list(expr.args) if isinstance(expr, sp.Add) else None


def _log_one_plus(e):
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and sp.S.One in e.args[0].args:
        return log1p(e.args[0] - 1)


def _exp_minus_one(e):
    """c*exp(x) - c -> c*expm1(x), for a number or a product c (so 1 - exp(-x) -> -expm1(-x))."""
    terms = _add_terms(e)
    if terms:
        for t in terms:
            for f in sp.Mul.make_args(t):
                if isinstance(f, sp.exp):
                    c = t / f
                    if -c in terms and not c.has(f):
                        others = [u for u in terms if u is not t and u != -c]
                        return sp.Add(c * expm1(f.args[0]), *others)


def _expm1_over_factor(e):
    """expm1(a*u)/a -> u*exprel(a*u) where |a*u| <= 1: where a*u is subnormal it keeps only a
    few bits, which the quotient by a exposes; exprel(a*u) = 1 + a*u/2 + ... keeps them all."""
    if not isinstance(e, sp.Mul):
        return None
    for f in e.args:
        if not (isinstance(f, sp.Pow) and f.exp == -1 and not f.base.is_Number):
            continue
        for g in e.args:
            if isinstance(g, expm1):
                u = _factor_out(g.args[0], f.base)
                if u is not None:
                    rest = [h for h in e.args if h is not f and h is not g]
                    z = g.args[0]
                    return sp.Mul(*rest) * sp.Piecewise((u * exprel(z), sp.Abs(z) <= 1), (group(g) / f.base, True))


def _log1p_of_quotient(e):
    """m*log1p(q/m) -> q*log1prel(q/m) where |q/m| <= 1: where q/m is subnormal, log1p keeps
    only its few bits, which the product with a large m exposes (Barron's loss,
    |alpha - 2|*log1p(x**2/(c**2*|alpha - 2|)) at alpha = -1e300, x = 1e-8); a factor m of a
    Piecewise one of whose branches holds such a log1p is first taken into every branch."""
    if not isinstance(e, sp.Mul):
        return None
    for m in e.args:
        if m.is_Number:
            continue
        others = [a for a in e.args if a is not m]
        for f in others:
            rest = sp.Mul(*[a for a in others if a is not f])
            q = _times(f.args[0], m) if isinstance(f, log1p) else None
            if q is not None:
                u = f.args[0]
                return rest * sp.Piecewise((q * log1prel(u), sp.Abs(u) <= 1), (m * group(f), True))
            if isinstance(f, sp.Piecewise) and any(isinstance(g, log1p) and _times(g.args[0], m) is not None
                                                   for branch, _ in f.args for g in sp.Mul.make_args(branch)):
                return sp.Piecewise(*[(_or_same(_log1p_of_quotient, rest * m * branch), condition)
                                      for branch, condition in f.args])


def _times(u, m):
    """m*u, by taking one factor 1/m out of the product u (or out of a group in it), else None."""
    if isinstance(u, group):
        inner = _times(u.args[0], m)
        return None if inner is None else u.func(inner)
    if not isinstance(u, sp.Mul):
        return None
    args = list(u.args)
    if 1 / m in args:
        args.remove(1 / m)
        return sp.Mul(*args)
    for i, a in enumerate(args):
        if isinstance(a, group) and a.has(m):
            inner = _times(a, m)
            if inner is not None:
                return sp.Mul(*args[:i], inner, *args[i + 1:])
    return None


def _factor_out(z, a):
    """u with z = a*u exactly (xlogy(a, w) counting as a*log(w)), or None."""
    inner = z.args[0] if isinstance(z, group) else z
    inner = inner.replace(lambda e: isinstance(e, (xlogy, xlog1py)),
                          lambda e: e.args[0] * (sp.log if isinstance(e, xlogy) else log1p)(e.args[1]))
    factors = sp.Mul.make_args(sp.factor_terms(inner))
    if a in factors:
        return sp.Mul(*[f for f in factors if f is not a]) if factors.count(a) == 1 else None


def _power_minus_one(e):
    """c*a**k - c -> c*expm1(k*log(a)) for a non-integer k: a**k rounds to 1 when k*log(a) is
    small (Barron's loss near alpha = 0)."""
    terms = _add_terms(e)
    if terms:
        for t in terms:
            for f in sp.Mul.make_args(t):
                if isinstance(f, sp.Pow) and not f.exp.is_Integer and f.exp != sp.S.Half and f.exp != -sp.S.Half:
                    c = t / f
                    if -c in terms and not c.has(f.base):
                        others = [u for u in terms if u is not t and u != -c]
                        return sp.Add(c * expm1(f.exp * sp.log(f.base)), *others)


def _power_of_one_plus(e):
    """(1 + w)**k -> exp(xlog1py(k, w)) for a symbolic k (also ((A + B)/A)**k, with w = B/A):
    1 + w rounds w, and raised to the k-th power that rounding grows k-fold (Barron's
    (1 + x**2/|alpha - 2|)**(alpha/2) at alpha = -1e12); log1p(w) keeps w's digits."""
    if not (isinstance(e, sp.Pow) and not e.exp.is_Number and not e.base.is_Number):
        return None
    base = e.base
    if isinstance(base, sp.Add) and sp.S.One in base.args:
        w = base - 1
    elif isinstance(base, sp.Mul) and any(isinstance(f, sp.Add) for f in base.args):
        w = sp.together(base - 1)
        if len(sp.Add.make_args(sp.expand(sp.fraction(w)[0]))) >= \
                len(sp.Add.make_args(sp.expand(sp.fraction(sp.together(base))[0]))):
            return None  # base - 1 is no simpler than base: no 1 to take out
    else:
        return None
    return sp.exp(xlog1py(e.exp, w))


def _log_one_minus_exp(e):
    """log1p(-exp(u)) -> log(-expm1(u)) where u > -log 2, and xlog1py(k, -exp(u)) alike
    (M. Maechler, Accurately Computing log(1 - exp(-|a|)), 2012): where exp(u) is close to 1,
    1 - exp(u) has lost its digits before log1p sees it."""
    if isinstance(e, log1p):
        k, w = None, e.args[0]
    elif isinstance(e, xlog1py):
        k, w = e.args
    else:
        return None
    if not (isinstance(w, sp.Mul) and len(w.args) == 2 and w.args[0] == -1 and isinstance(w.args[1], sp.exp)):
        return None
    u = w.args[1].args[0]
    near = -expm1(u)
    far = group(w)  # left as it is, and seen as done
    if k is None:
        return sp.Piecewise((sp.log(near), u > -sp.log(2)), (log1p(far), True))
    return sp.Piecewise((xlogy(k, near), u > -sp.log(2)), (xlog1py(k, far), True))


def _log_difference(e):
    """c*log(a) - c*log(b) -> c*log1p((a - b)/b) where a/b lies in (1/2, 2), and likewise
    xlogy(c, a) - xlogy(c, b): two logarithms of close values cancel to their rounding
    errors, while a - b is exact there (Sterbenz); elsewhere the difference keeps its digits."""
    terms = _add_terms(e)
    if not terms:
        return None
    logs = {}
    for t in terms:
        for f in sp.Mul.make_args(t):
            if isinstance(f, xlogy):
                logs[t] = (t / f * f.args[0], f.args[1], xlogy)
            elif isinstance(f, sp.log) and not f.args[0].is_Number:
                logs[t] = (t / f, f.args[0], None)
    for t, (c, a, kind) in logs.items():
        for u, (d, b, other) in logs.items():
            if u is t or other is not kind or a == b or sp.expand(c + d) != 0 or c.has(a) or c.has(b):
                continue
            near = c * log1p(group((a - b) / b))
            far = t + group(u)  # as it was, and seen as done
            rest = [v for v in terms if v is not t and v is not u]
            return sp.Add(sp.Piecewise((near, sp.And(a < 2 * b, 2 * a > b)), (far, True)), *rest)
    return None


def _mixture_entropy(e):
    """c*(xlogy(a, a) - xlogy(a, m) + xlogy(b, b) - xlogy(b, m)), m = (a + b)/2, a, b >= 0
    (twice the Jensen-Shannon term of a and b): with t = (a - b)/(a + b), this is
    c*m*(log1p(-t**2) + 2*t*atanh(t)) = c*m*(t**2 + t**4/6 + ...), used where |t| < 1/2; there
    the four terms, each of first order in a - b, cancel, while log1p(-t**2) and 2*t*atanh(t)
    differ in sign by a factor of about 2. Elsewhere (a + b > 0) it is
    c*(xlogy(a, 2a/(a + b)) + xlogy(b, 2b/(a + b))): one logarithm of a quotient, not
    log(a) - log(m), which cancels where a is tiny; 2a/(a + b) keeps the digits that 1 + t
    loses (1 + t = 0 at a = 1e-300, b = 1)."""
    terms = _add_terms(e)
    if not terms or len(terms) < 4:
        return None
    logs = []
    for t in terms:
        for f in sp.Mul.make_args(t):
            if isinstance(f, xlogy):
                logs.append((t, t / f, f.args[0], f.args[1]))
                break
    for t1, c, a, a_again in logs:
        for t2, c2, b, b_again in logs:
            if t2 is t1 or a_again != a or b_again != b or a == b or sp.expand(c - c2) != 0 \
                    or not (a.is_nonnegative and b.is_nonnegative) or c.has(a) or c.has(b):
                continue
            m = (a + b) / 2
            partners = []
            for x in (a, b):
                partners += [u for u, d, y, w in logs if y == x and u is not t1 and u is not t2
                             and sp.expand(c + d) == 0 and sp.expand(w - m) == 0][:1]
            if len(partners) != 2:
                continue
            ratio = group((a - b) / (a + b))
            near = c * group(m * (log1p(-ratio**2) + 2 * ratio * sp.atanh(ratio)))
            far = c * (xlogy(a, group(2 * a / (a + b))) + xlogy(b, group(2 * b / (a + b))))
            as_it_was = t1 + t2 + group(partners[0]) + group(partners[1])  # a = b = 0; seen as done
            rest = [v for v in terms if v not in (t1, t2, *partners)]
            return sp.Add(sp.Piecewise((near, 2 * sp.Abs(a - b) < a + b), (far, a + b > 0), (as_it_was, True)),
                          *rest)
    return None


def _log_cosh(e):
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.cosh):
        return logcosh(e.args[0].args[0])


def _sinh_over_cosh(e):
    if isinstance(e, sp.Mul):
        powers = e.as_powers_dict()
        for base, k in powers.items():
            if isinstance(base, sp.sinh) and powers.get(sp.cosh(base.args[0])) == -k:
                others = [b ** j for b, j in powers.items() if b not in (base, sp.cosh(base.args[0]))]
                return sp.Mul(sp.tanh(base.args[0]) ** k, *others)


def _cosh2_minus_sinh2(e):
    terms = _add_terms(e)
    if terms:
        for t in terms:
            if isinstance(t, sp.Pow) and isinstance(t.base, sp.cosh) and t.exp == 2:
                partner = -sp.sinh(t.base.args[0]) ** 2
                if partner in terms:
                    rest = [u for u in terms if u is not t and u != partner]
                    return sp.Add(sp.S.One, *rest)


def _one_minus_tanh2(e):
    terms = _add_terms(e)
    if terms and sp.S.One in terms:
        for t in terms:
            if (isinstance(t, sp.Mul) and len(t.args) == 2 and t.args[0] == -1
                    and isinstance(t.args[1], sp.Pow) and isinstance(t.args[1].base, sp.tanh)
                    and t.args[1].exp == 2):
                rest = [u for u in terms if u is not t and u != sp.S.One]
                return sp.Add(sp.cosh(t.args[1].base.args[0]) ** -2, *rest)


def _sum_of_two_squares(base):
    """(x, y) when base is x**2 + y**2 (or c**2 x**2 + y**2 with a constant c), else None."""
    terms = _add_terms(base)
    if not terms or len(terms) != 2:
        return None
    roots = []
    for t in terms:
        root = sp.sqrt(t)
        exact_root = not isinstance(root, sp.Pow) or (t.is_Number and t.is_positive)
        if not (t.is_nonnegative and (isinstance(t, (sp.Pow, sp.Mul)) or t.is_Number) and exact_root):
            return None
        roots.append(root)
    return sorted(roots, key=sp.default_sort_key)


def _hypot(e):
    if isinstance(e, sp.Pow) and e.exp.is_Rational and e.exp.q == 2:
        roots = _sum_of_two_squares(e.base)
        if roots:
            return hypot(*roots) ** (e.exp * 2)


def _sqrt_one_plus_minus_one(e):
    terms = _add_terms(e)
    if terms and sp.S.NegativeOne in terms:
        for t in terms:
            if (isinstance(t, sp.Pow) and t.exp == sp.S.Half and isinstance(t.base, sp.Add)
                    and sp.S.One in t.base.args):
                u = t.base - 1
                rest = [v for v in terms if v is not t and v != sp.S.NegativeOne]
                return sp.Add(u / (t + 1), *rest)


def _one_minus_sigmoid(e):
    terms = _add_terms(e)
    if terms and sp.S.One in terms:
        for t in terms:
            if isinstance(t, sp.Mul) and t.args[0] == -1 and len(t.args) == 2 and isinstance(t.args[1], sigmoid):
                rest = [u for u in terms if u is not t and u != sp.S.One]
                return sp.Add(sigmoid(-t.args[1].args[0]), *rest)


def _difference_of_squares(e):
    """a**2 - b**2 -> (a - b)*(a + b): a - b is exact where a and b are close (Sterbenz). Beside
    the square of a symbol (an input or parameter, exact), a number that is the square of a
    rational is a square too: 1 - c**2 -> (1 - c)*(1 + c), which keeps its digits at
    c = 1 - 5.3e-9, where c**2 rounds away c's last bits (relative error 2.6e-9). (A placeholder's square, such
    as a unit weight's w**2 - 1, is left as it is: its value is computed, with its own rounding.)"""
    terms = _add_terms(e)
    if terms and len(terms) == 2:
        squares = []
        for t in terms:
            coefficient, rest = t.as_coeff_Mul()
            if t.is_Rational and t != 0 and sp.sqrt(abs(t)).is_Rational:
                squares.append((sp.sign(t), sp.sqrt(abs(t))))
                continue
            if abs(coefficient) != 1 or not (isinstance(rest, sp.Pow) and rest.exp == 2):
                return None
            squares.append((coefficient, rest.base))
        numbers = [b for _, b in squares if b.is_Number]
        if numbers and not (len(numbers) == 1 and any(_spec_symbol(b) for _, b in squares)):
            return None
        (c1, a), (c2, b) = squares
        if c1 == -c2:
            a, b = (a, b) if c1 == 1 else (b, a)
            return (a - b) * (a + b)


def _spec_symbol(e) -> bool:
    """An input or parameter of a spec (their names never start with _; lossgen's placeholders'
    do)."""
    return isinstance(e, sp.Symbol) and not e.name.startswith("_")


def _through_acos(f):
    """(a, x) where f is sin(a + acos(x)) or cos(a + acos(x)), or a power of one; else None."""
    if isinstance(f, sp.Pow) and f.exp.is_Integer and f.exp > 0:
        f = f.base
    if isinstance(f, (sp.sin, sp.cos)):
        inverse = [t for t in sp.Add.make_args(f.args[0]) if isinstance(t, sp.acos)]
        if len(inverse) == 1:
            return f.args[0] - inverse[0], inverse[0].args[0]
    return None


def _angle_through_acos(e):
    """cos(a + acos(x)) -> x*cos(a) - sqrt(q)*sin(a) and sin(a + acos(x)) -> sqrt(q)*cos(a) +
    x*sin(a), q = (1 - x)*(1 + x) = sin(acos(x))**2, in a sum or product that holds them as
    factors, with every power of 1 - x**2 (or x**2 - 1, or q) there written in q and the product
    expanded, so that powers of q combine. acos(x) near pi (x = -1 + 1e-16) keeps only its
    rounding beside pi, which sin(acos(x)) returns (relative error 1e-8); and derivatives of the
    functions through acos cancel: d/dx sin(a + acos(x))/sqrt(1 - x**2) = x*sin(a + acos(x))/
    q**(3/2) - cos(a + acos(x))/q, in which x*cos(a)/q cancels exactly, leaving
    sin(a)*(sqrt(q)/q + x**2/q**(3/2)) (= sin(a)/q**(3/2)), two terms of one sign, 0 at a = 0."""
    if not isinstance(e, (sp.Add, sp.Mul)):
        return None
    found = [(f, _through_acos(f)) for t in sp.Add.make_args(e) for f in sp.Mul.make_args(t)]
    found = sorted({f.base if isinstance(f, sp.Pow) else f: ax for f, ax in found if ax}.items(),
                   key=lambda item: sp.default_sort_key(item[0]))
    if not found:
        return None
    x = found[0][1][1]
    q = sp.Dummy("q", positive=True)
    root = sp.sqrt(q)
    mapping = {}
    for f, (a, y) in found:
        if y == x:
            mapping[f] = x * sp.cos(a) - root * sp.sin(a) if isinstance(f, sp.cos) else root * sp.cos(a) + x * sp.sin(a)
    product = sp.expand((1 - x) * (1 + x))
    terms = []
    for t in sp.Add.make_args(e):
        factors = []
        for f in sp.Mul.make_args(t):
            base, k = (f.base, f.exp) if isinstance(f, sp.Pow) else (f, sp.S.One)
            if isinstance(base, (sp.Add, sp.Mul)) and not base.has(sp.acos):
                expanded = sp.expand(base)
                if expanded == product:
                    base = q
                elif expanded == -product and k.is_Integer:
                    base = -q
            factors.append(base.xreplace(mapping) ** k)
        terms.append(sp.expand_mul(sp.Mul(*factors), deep=False))
    return sp.Add(*terms).xreplace({q: (1 - x) * (1 + x)})


def _weighted_squares(e):
    """a*u**2 + b*v**2 -> (a + b)*u**2 + b*(v - u)*(v + u) where a and b differ in sign and
    |b| <= |a| (else, with the roles swapped, (a + b)*v**2 + a*(u - v)*(u + v)), for
    coefficients a, b free of u and v whose sum a + b simplifies: some symbol of a and b cancels
    in it (for Barron's Hessian, |alpha - 2|*c**2 - (1 - alpha)*x**2, a + b = 1 for alpha < 2).

    Where a*u**2 and b*v**2 nearly cancel, each carries the rounding of its own size, and of
    v's (x = p - y, rounded, then squared): at alpha = -1e12, |x| ~ c, two terms of 1e12 leave
    2e4. The rewritten terms are never larger, |a + b| u**2 + |b| |v**2 - u**2| <=
    |a| u**2 + |b| v**2 when |b| <= |a|, and near the sum's zero they are |a + b|/|a| times
    smaller; v - u and v + u are exact sums (rule exact_sum) and v**2 is not formed. An
    Abs(g) in a or b is resolved by a branch on the sign of g (for a parameter g, one branch
    per call), so that a + b can simplify; elsewhere, and where a and b have the same sign (no
    cancellation), the sum stays as it was."""
    terms = _add_terms(e)
    if not terms or len(terms) != 2:
        return None
    for (t1, t2) in (terms, terms[::-1]):
        for u, a in _squares_of(t1):
            for v, b in _squares_of(t2):
                if u == v or a.has(u, v) or b.has(u, v):
                    continue
                branches = _weighted_square_branches(a, u, b, v)
                if branches:
                    return sp.Piecewise(*branches, (t1 + group(t2), True))  # as it was, and seen as done
    return None


def _squares_of(term):
    """(base, coefficient) for each way of writing ``term`` as coefficient*base**2."""
    return [(f.base, term / f) for f in sp.Mul.make_args(term)
            if isinstance(f, sp.Pow) and f.exp == 2 and not f.base.is_Number]


def _known_sign(expr) -> int:
    return 1 if expr.is_nonnegative else -1 if expr.is_nonpositive else 0


def _weighted_square_branches(a, u, b, v) -> list:
    """The (expression, condition) branches of rule weighted_squares, or [] where a + b
    simplifies under no sign of the Abs in a and b."""
    ungrouped = lambda z: z.replace(lambda f: isinstance(f, group), lambda f: f.args[0])  # noqa: E731
    absolutes = sorted((f for f in (a + b).atoms(sp.Abs) if not f.has(u, v)), key=sp.default_sort_key)
    if len(absolutes) > 2:
        return []
    branches = []
    for signs in _sign_choices(len(absolutes)):
        resolved = {f: s * f.args[0] for f, s in zip(absolutes, signs)}
        where = [f.args[0] >= 0 if s > 0 else f.args[0] < 0 for f, s in zip(absolutes, signs)]
        a_s, b_s = a.xreplace(resolved), b.xreplace(resolved)
        total = sp.expand(ungrouped(a_s + b_s))
        if not (ungrouped(a_s).free_symbols | ungrouped(b_s).free_symbols) - total.free_symbols:
            continue  # no symbol cancels: a + b is no more accurate than a and b
        # a and b of opposite signs; where the sign of one is known, that of the other decides
        sign_a, sign_b, sign_total = _known_sign(a), _known_sign(b), _known_sign(total)
        opposite = b_s < 0 if sign_a > 0 else b_s > 0 if sign_a < 0 else a_s < 0 if sign_b > 0 \
            else a_s > 0 if sign_b < 0 else a_s * b_s < 0
        anchored_at_u = total * u**2 + b_s * (v - u) * (v + u)
        anchored_at_v = total * v**2 + a_s * (u - v) * (u + v)
        # with opposite signs, |b| <= |a| exactly where a + b has the sign of a (or is 0)
        if sign_total and sign_total in (sign_a, -sign_b):
            branches.append((anchored_at_u, sp.And(*where, opposite)))
        elif sign_total and sign_total in (sign_b, -sign_a):
            branches.append((anchored_at_v, sp.And(*where, opposite)))
        else:
            branches += [(anchored_at_u, sp.And(*where, opposite, sp.Abs(b_s) <= sp.Abs(a_s))),
                         (anchored_at_v, sp.And(*where, opposite))]
    return [(form, condition) for form, condition in branches if condition != sp.false]


def _sign_choices(n: int) -> list[tuple[int, ...]]:
    return [()] if n == 0 else [(s, *rest) for s in (1, -1) for rest in _sign_choices(n - 1)]


def _sum_of_atoms(e):
    """a + b + c + ... of inputs, parameters and numbers (each may be scaled by a power of two,
    exactly: 2 a - p - n) -> exact_sum(...): delta + p - y keeps its digits both where p is
    close to -delta and where y is close to delta."""
    terms = _add_terms(e)
    if terms and len(terms) >= 3 and all(_signed_atom(t, scaled=True) for t in terms):
        return exact_sum(*sorted(terms, key=sp.default_sort_key))


def _signed_atom(term, scaled: bool = False) -> bool:
    """+-x for an input, parameter or number x; with ``scaled``, also +-2**k x (k >= 1: an
    exact scaling)."""
    coefficient, rest = term.as_coeff_Mul()
    c = abs(coefficient)
    power_of_two = scaled and c.is_Integer and c > 1 and (int(c) & (int(c) - 1)) == 0
    return (c == 1 or power_of_two) and (rest.is_Symbol or rest.is_Number)


# the symbols known to lie in [0, 1] (inputs and parameters of domain probability,
# unit_interval, label01, ...) for the expression being stabilised: set by unit_interval()
_UNIT_SYMBOLS: ContextVar[frozenset] = ContextVar("unit_symbols", default=frozenset())
CORNERS_MAX_VARIABLES = 4  # 2**4 corners at most


@contextmanager
def _symbols_known(variable: ContextVar, symbols):
    """Within this context, ``variable`` (what the rules may assume of some symbols) holds
    ``symbols``."""
    token = variable.set(frozenset(symbols))
    try:
        yield
    finally:
        variable.reset(token)


def unit_interval(symbols):
    """Within this context, rules may take ``symbols`` to lie in [0, 1] (rule
    multilinear_corners)."""
    return _symbols_known(_UNIT_SYMBOLS, symbols)


def unit_interval_symbols(spec) -> frozenset:
    """The symbols of ``spec``'s inputs and parameters whose domain lies in [0, 1]."""
    def inside(name):
        d = DOMAINS[name]
        return all(0 <= v <= 1 for v in d.values) if d.values else d.low >= 0 and d.high <= 1
    return frozenset(spec.symbols[e.name] for e in (*spec.inputs, *spec.params) if inside(e.domain))


def _multilinear_corners(e):
    """A polynomial with numeric coefficients, of degree <= 1 in each of its variables, all
    known to lie in [0, 1] (``unit_interval``), whose values at the corners of [0, 1]**n have
    one sign (zeros allowed) while its monomials do not -> its corner (Bernstein) form,
    sum over corners c of p(c)*prod(v if c_v = 1 else 1 - v).

    The expanded monomials are of the size of the coefficients and cancel where the value is
    small (alpha*y - alpha/2 - y/2 + 1/2 = ((1 - alpha)(1 - y) + alpha*y)/2 is y/2 at alpha = 1,
    0 in float64 at y = 1e-300). In the corner form every term has the sign of the value, so
    nothing cancels: each 1 - v is exact for v in [1/2, 1] (Sterbenz) and rounded once, with a
    result >= 1/2, for v < 1/2, so each term and their sum keep a few ulps' relative error.
    A polynomial whose corner values differ in sign (y - 1/2) has zeros inside the box, where
    no form without cancellation is known; one whose monomials share a sign cannot cancel:
    both are left as they are."""
    unit = _UNIT_SYMBOLS.get()
    if not unit or not isinstance(e, sp.Add):
        return None
    variables = sorted(e.free_symbols, key=sp.default_sort_key)
    if not variables or len(variables) > CORNERS_MAX_VARIABLES or not set(variables) <= unit \
            or not e.is_polynomial(*variables):
        return None
    polynomial = sp.Poly(e, *variables)
    coefficients = polynomial.coeffs()
    if max(polynomial.degree_list()) > 1 or not all(c.is_Number for c in coefficients) \
            or all(c > 0 for c in coefficients) or all(c < 0 for c in coefficients):
        return None
    corners = [(c, e.xreplace(dict(zip(variables, c)))) for c in product((0, 1), repeat=len(variables))]
    if not (all(value >= 0 for _, value in corners) or all(value <= 0 for _, value in corners)):
        return None
    form = sp.Add(*[value * sp.Mul(*[v if bit else 1 - v for v, bit in zip(variables, c)])
                    for c, value in corners if value != 0])
    return None if form == e else form


def _collect_pair(e):
    """a*F + b*F -> (a + b)*F for two terms of a longer sum with a short ratio: x**2*alpha - x**2
    cancels at alpha = 1 whatever the order of the sum, x**2*(alpha - 1) does not."""
    terms = _add_terms(e)
    if not terms or len(terms) < 3:
        return None
    pairs = [(t, u) for i, t in enumerate(terms) for u in terms[i + 1:]]
    for t, u in pairs + [(u, t) for t, u in pairs]:
        ratio = t / u
        if not ratio.is_Number and not ratio.has(sp.Function, sp.Piecewise) and sp.count_ops(ratio) <= 2 \
                and sp.fraction(ratio)[1] == 1 and (u.has(sp.Pow) or t.has(sp.Pow)):
            rest = [v for v in terms if v is not t and v is not u]
            return sp.Add(u * group(ratio + 1), *rest)


def _hypot_one_minus_one(e):
    """hypot(1, u) - 1 -> u*(u/(hypot(1, u) + 1)); the grouping keeps u**2 from overflowing."""
    terms = _add_terms(e)
    if terms and sp.S.NegativeOne in terms:
        for t in terms:
            if isinstance(t, hypot) and sp.S.One in t.args:
                u = t.args[1] if t.args[0] == 1 else t.args[0]
                rest = [v for v in terms if v is not t and v != sp.S.NegativeOne]
                return sp.Add(u * group(u / (t + 1)), *rest)


def _log_sigmoid(e):
    if isinstance(e, sp.log) and isinstance(e.args[0], sigmoid):
        return -softplus(-e.args[0].args[0])


def _logistic_fraction(e):
    """(1 + exp(a))**-k -> sigmoid(-a)**k."""
    if isinstance(e, sp.Pow) and e.exp.is_Integer and e.exp < 0 and isinstance(e.base, sp.Add) \
            and len(e.base.args) == 2 and sp.S.One in e.base.args:
        other = e.base - 1
        if isinstance(other, sp.exp):
            return sigmoid(-other.args[0]) ** -e.exp


def _exp_times_sigmoid(e):
    """exp(a)*sigmoid(-a)**k -> sigmoid(a)*sigmoid(-a)**(k - 1) (from exp(a)/(1 + exp(a))**k)."""
    if isinstance(e, sp.Mul):
        for f in e.args:
            if not isinstance(f, sp.exp):
                continue
            s = sigmoid(-f.args[0])
            for g in e.args:
                k = 1 if g == s else (g.exp if isinstance(g, sp.Pow) and g.base == s and g.exp.is_Integer else 0)
                if k >= 1:
                    rest = [h for h in e.args if h is not f and h is not g]
                    return sp.Mul(sigmoid(f.args[0]), s ** (k - 1), *rest)


def _heaviside_select(e):
    """Heaviside(u)*X -> X where u > 0, 0 where u < 0: the unselected X is never multiplied
    by 0, so an overflowing X gives 0 there instead of 0*inf = nan."""
    if isinstance(e, sp.Mul):
        if any(isinstance(f, sp.Add) and f.has(sp.Heaviside) for f in e.args):
            return sp.expand_mul(e, deep=False)  # X*(H1 + H2) -> X*H1 + X*H2, then select each
        if all(isinstance(f, sp.Heaviside) or f.is_Number for f in e.args):
            return None  # nothing to protect yet: wait for the product with the value X
        for f in e.args:
            if isinstance(f, sp.Heaviside):
                u, at_zero = f.args[0], (f.args[1] if len(f.args) > 1 else sp.S.Half)
                rest = sp.Mul(*[g for g in e.args if g is not f])
                return sp.Piecewise((rest, u > 0), (at_zero * rest, sp.Eq(u, 0)), (0, True))


def _sign_and_log_abs(product) -> tuple[sp.Expr, sp.Expr]:
    """(sign(product), log|product|) as the product of the signs and the sum of k*log|f| over
    its factors f**k: a factor may over- or underflow (Barron's (alpha - 2)**2 at
    alpha = -1e300) where its sign and logarithm do not."""
    signs, logs = [], []
    for f in sp.Mul.make_args(product):
        base, k = f.as_base_exp() if isinstance(f, sp.Pow) and f.exp.is_Integer else (f, sp.S.One)
        base = base if base.is_real else real_group(base)
        signs.append(sp.sign(base) ** (k % 2))
        logs.append(k * sp.log(sp.Abs(base)))
    return sp.Mul(*signs), sp.Add(*logs)


def _exp_times_factor(e):
    """b*exp(a) -> sign(b)*exp(a + log|b|) where |a| > 700: exp(a) alone overflows (or loses
    its digits as a subnormal) while the product is a normal number (or 0, for b = 0). A
    quotient b = N/D is computed first, as one group: exp(a)*N overflows where
    exp(a)*(N/D) need not (Barron's Hessian, exp(a) = x**alpha times N ~ x**2, over D ~ x**4);
    log|b| is the sum of its factors' logs, finite where b itself overflows."""
    if not isinstance(e, sp.Mul):
        return None
    coefficient, rest = e.as_coeff_Mul()
    factors = sp.Mul.make_args(rest)
    exps = [f for f in factors if isinstance(f, sp.exp)]
    others = [f for f in factors if not isinstance(f, sp.exp)]
    if len(exps) > 1 and others and any(isinstance(f, sp.Pow) and f.exp.is_negative and not f.base.is_Number
                                        for f in others):
        # exp(a) exp(c) N/D: one exponential, exp(a + c) (the focal loss's softmax times
        # (1 - softmax)**gamma, exp(u) exp(gamma log1p(-exp(u)))), so that N/D joins its exponent
        exponent = sp.Add(*(f.args[0] for f in exps))
        if not exponent.is_real:
            return None
        return coefficient * _exp_product_branches(exponent, real_group(sp.Mul(*others)), others)
    if len(exps) != 1:
        return None
    if len(e.args) in (2, 3) and len(others) == 1 and others[0].is_Symbol:
        b = others[0]
    elif any(isinstance(f, sp.Pow) and f.exp.is_negative and not f.base.is_Number for f in others) \
            and exps[0].args[0].is_real and not exps[0].args[0].is_Symbol:
        b = group(sp.Mul(*others))
    else:
        return None
    return coefficient * _exp_product_branches(exps[0].args[0], b, others)


def _exp_product_branches(a, b, factors):
    """b*exp(a) where |a| <= 700, else sign(b)*exp(a + log|b|) from b's ``factors``."""
    sign, log_abs = _sign_and_log_abs(sp.Mul(*factors))
    return sp.Piecewise((b * sp.exp(a), sp.Abs(a) <= 700), (sign * sp.exp(group(a + log_abs)), True))


SMALL_BASE = 1e-100  # below it, B**e (e >= -3) may overflow, and so may products of factors of B's size
_LOG_DOMAIN: dict = {}  # placeholder -> the log-domain product it stands for (see _power_in_log_domain)
_LOG_DOMAIN_BASE: dict = {}  # placeholder -> the base B whose size selects it
VANISHING = (sigmoid, softplus, sp.exp)  # functions that under- (or over-)flow where their logs do not


def _vanishing(f) -> bool:
    """True where f under- or overflows with a function of VANISHING: f is one, a power of one,
    a product with one, or a sum each of whose terms is such."""
    if isinstance(f, VANISHING):
        return True
    if isinstance(f, sp.Pow):
        return _vanishing(f.base)
    if isinstance(f, sp.Mul):
        return any(_vanishing(g) for g in f.args)
    if isinstance(f, sp.Add):
        return all(_vanishing(t) for t in f.args)
    return False


def _signed_log(f) -> tuple[sp.Expr, sp.Expr]:
    """(sign(f), log|f|), with log|f| finite where f itself under- or overflows: log sigmoid(a) =
    -softplus(-a); log softplus(a) = min(a, 0) + log(m + exp(-m)*log1prel(exp(-|a|))), m =
    max(a, 0) (for a < 0, softplus(a) = exp(a)*log1prel(exp(a)), and exp(a) alone underflows);
    log exp(a) = a; a power's or a product's log is the sum of its factors' logs; a sum's, from
    its terms' signs s, t and logs L, M: max(L, M) + log1p(s*t*exp(-|L - M|)) (logaddexp for
    s = t = 1), with the sign of the term of larger log ((s + t + (s - t)*sign(L - M))/2). Any
    other factor w gives sign(w) and log|w| (-inf at w = 0)."""
    if isinstance(f, sigmoid):
        return sp.S.One, -softplus(-f.args[0])
    if isinstance(f, softplus):
        a = f.args[0]
        m = sp.Max(a, 0)
        return sp.S.One, sp.Min(a, 0) + sp.log(m + sp.exp(-m) * log1prel(sp.exp(-sp.Abs(a))))
    if isinstance(f, sp.exp) and f.args[0].is_real:
        return sp.S.One, f.args[0]
    if isinstance(f, sp.Pow) and f.exp.is_real and _vanishing(f.base):
        sign, log_abs = _signed_log(f.base)
        return (sign ** (f.exp % 2) if f.exp.is_Integer else sp.S.One), f.exp * log_abs
    if isinstance(f, sp.Mul) and any(_vanishing(g) for g in f.args):
        parts = [_signed_log(g) for g in f.args]
        return sp.Mul(*[p[0] for p in parts]), sp.Add(*[p[1] for p in parts])
    if isinstance(f, sp.Add) and _vanishing(f):
        parts = sorted((_signed_log(t) for t in f.args), key=sp.default_sort_key)
        sign, log_abs = parts[0]
        for other_sign, other_log in parts[1:]:
            if sign == 1 and other_sign == 1:
                log_abs = logaddexp(log_abs, other_log)
                continue
            larger = sp.sign(log_abs - other_log)  # 1 where this sum's log is the larger
            sign, log_abs = ((sign + other_sign + (sign - other_sign) * larger) / 2,
                             sp.Max(log_abs, other_log)
                             + log1p(sign * other_sign * sp.exp(-sp.Abs(log_abs - other_log))))
        return sign, log_abs
    return _sign_and_log_abs(f)


def _power_in_log_domain(e):
    """b*B**e, e not known to be >= 0, B and a factor of b under- or overflowing with
    functions of VANISHING -> sign(b)*exp(e*log|B| + log|b|) where B < SMALL_BASE, each log from
    :func:`_signed_log`: where B underflows, B**e is inf (e < 0), and 0*inf = nan with b, which
    vanishes with B, while the product is finite: the focal loss's (1 - p_t)**(gamma - 1) times
    the cross-entropy times sigmoid(x) is of the size of (1 - p_t)**(gamma + 1). Elsewhere
    b*B**e as it was (the power grouped: seen as done).

    The log-domain product stands in the result as a placeholder symbol until the rules and
    the splits are done (:func:`resolve_log_domain`): other rules would take its exponential
    apart again (exp_product, with a quotient by B), and splits would rewrite its logs."""
    if not isinstance(e, sp.Mul):
        return None
    coefficient, rest = e.as_coeff_Mul()
    factors = sp.Mul.make_args(rest)
    for p in factors:
        if not (isinstance(p, sp.Pow) and not p.exp.is_Number and p.exp.is_real and p.exp.is_integer is not True
                and p.exp.is_nonnegative is not True and _vanishing(p.base)):
            continue
        others = [f for f in factors if f is not p]
        if not any(_vanishing(f) for f in others):
            continue
        parts = [_signed_log(f) for f in others]
        _, base_log = _signed_log(p.base)  # a real power's base is >= 0 (its exponent is no integer)
        exponent = sp.Add(p.exp * base_log, sp.log(sp.Abs(coefficient)), *[q[1] for q in parts])
        far = sp.sign(coefficient) * sp.Mul(*[q[0] for q in parts]) * sp.exp(group(exponent))
        placeholder = sp.Symbol("_log_domain_" + hashlib.sha256(sp.srepr(far).encode()).hexdigest()[:16], real=True)
        _LOG_DOMAIN[placeholder], _LOG_DOMAIN_BASE[placeholder] = far, p.base
        near = coefficient * group(p) * sp.Mul(*others)
        return sp.Piecewise((placeholder, p.base < SMALL_BASE), (near, True))
    return None


def resolve_log_domain(expr: sp.Expr) -> sp.Expr:
    """``expr`` with the placeholders of :func:`_power_in_log_domain` replaced by their products."""
    while True:
        found = {s: _LOG_DOMAIN[s] for s in expr.free_symbols if s in _LOG_DOMAIN}
        if not found:
            return expr
        expr = expr.xreplace(found)


def _distribute_to_cancel(e):
    """x*(a/x + b) -> a + x*b, and X**g*(c/X + d) -> c*X**(g - 1) + d*X**g: where x underflows,
    x*(a/x) is 0*inf = nan, while the cancelled form is exact. Also where the quotient sits in
    a sum inside a product inside the sum, x*(c*(a/x + b) + d) -> c*(a + x*b) + x*d, at any
    depth: SymPy's derivative of an integer power u**n is n*u**(n - 1)*u', which it leaves as
    u*(...) with u' inside (the focal loss at gamma = 2 is Q*(2*A*s(x) + (c*s(x)/s(-x) - y)*Q)*s(-x),
    whose s(-x)/s(-x) a real gamma's u**gamma*(A/u + c*s(x)/s(-x) - y)*s(-x) shows at the top)."""
    if not isinstance(e, sp.Mul):
        return None
    for f in e.args:
        base = f.base if isinstance(f, sp.Pow) else f
        if base.is_Number:
            continue
        for a in e.args:
            if isinstance(a, sp.Add) and any(_divides_by(t, base, nested=False) for t in a.args):
                others = [g for g in e.args if g is not f and g is not a]
                return sp.Mul(*others) * sp.Add(*[_combine_powers(f * t) or f * t for t in a.args])
        if isinstance(f, sp.Pow) and not f.exp.is_positive:
            continue  # a nested quotient by x is cancelled by x or a positive power of it
        for a in e.args:
            if isinstance(a, sp.Add) and any(_divides_by(t, base) for t in a.args):
                others = [g for g in e.args if g is not f and g is not a]
                return sp.Mul(*others) * _distributed(f, a, base)


def _distributed(f, term, base):
    """f*term, with f multiplied into the sums of ``term`` (at any depth) that divide by ``base``."""
    if isinstance(term, sp.Add):
        return sp.Add(*[_distributed(f, t, base) for t in term.args])
    factors = sp.Mul.make_args(term)
    if not _divides_by(term, base, nested=False):
        for a in factors:
            if isinstance(a, sp.Add) and any(_divides_by(t, base) for t in a.args):
                return sp.Mul(*[g for g in factors if g is not a]) * _distributed(f, a, base)
    return _combine_powers(f * term) or f * term


def _combine_powers(e):
    """b**g * b**-k -> b**(g - k): b**g/b is 0/0 where b underflows. SymPy merges the
    exponents only for b known positive; a real power of b is real only for b >= 0 anyway."""
    if isinstance(e, sp.Mul):
        bases = [f.base if isinstance(f, sp.Pow) else f for f in e.args if not f.is_Number]
        if len(bases) != len(set(bases)):
            combined = sp.powsimp(e, force=True, combine="exp", deep=False)
            if combined != e:
                return combined


def _polynomial_degree(f, m) -> Optional[int]:
    """The degree of ``f`` in the symbol ``m`` where f is a polynomial in m (a product of
    sums and integer powers), else None."""
    if not f.has(m):
        return 0
    if f == m:
        return 1
    if isinstance(f, sp.Pow) and f.exp.is_Integer:
        d = _polynomial_degree(f.base, m)
        return None if d is None else d * int(f.exp)
    if isinstance(f, sp.Mul):
        degrees = [_polynomial_degree(g, m) for g in f.args]
        return None if None in degrees else sum(degrees)
    if isinstance(f, sp.Add):
        degrees = [_polynomial_degree(g, m) for g in f.args]
        return None if None in degrees or min(degrees) < 0 else max(degrees)
    return None


def _scaled_by(f, m, d, z):
    """f/m**d, term by term: each power of m divided into the terms it multiplies."""
    if d == 0:
        return f
    if isinstance(f, sp.Pow) and f.exp.is_Integer:
        base = _polynomial_degree(f.base, m)
        return _scaled_by(f.base, m, base, z) ** f.exp
    hidden = {}

    def hide(g):  # what is free of m stays whole: (p - y)**2 is not expanded
        if not g.has(m):
            return g if g.is_Atom else hidden.setdefault(g, sp.Dummy())
        return g.func(*[hide(a) for a in g.args]) if g.args else g

    powers = sp.collect(sp.expand(hide(f) / m**d), m, evaluate=False)
    parts = [_over_magnitude(sp.factor_terms(coefficient), power, m, z) for power, coefficient in powers.items()]
    restore = {v: k for k, v in hidden.items()}
    whole = sp.Add(*[sp.factor_terms(q) * power for power, q in powers.items()]).xreplace(restore)
    thresholds = [t for _, _, t in parts if t is not None]
    if not thresholds:
        return whole
    bounded = sp.Add(*[b for b, _, _ in parts]).xreplace(restore)
    small = sp.Add(*[s for _, s, _ in parts]).xreplace(restore)
    # where |z| is large, one sum of the bounded terms for each sign of z, evaluated first:
    # c**2 - x**2 cancels exactly (as (c - x)*(c + x)) before the small x**2/|z| is added;
    # where |z| is not, the small parts are not small and the coefficients stay whole
    threshold = max(thresholds)
    return sp.Piecewise((group(bounded.subs(sp.sign(z), 1)) + small, z >= threshold),
                        (group(bounded.subs(sp.sign(z), -1)) + small, z <= -threshold), (whole, True))


def _over_magnitude(coefficient, power, m, z) -> tuple:
    """coefficient*m**k as (bounded part, small part, |z| from which the small part is at most
    half the bounded one, or None), m = |z|: the bounded part is the term itself where k = 0;
    where k = -1 and the coefficient q is polynomial in z's variable a, q = s*z + r, so
    q/|z| = s*sign(z) + r/|z| ((alpha - 1)/|alpha - 2| = sign(alpha - 2) + 1/|alpha - 2|): a
    bounded part that can cancel exactly against other terms, and a small one for |z| >= 2|r/s|."""
    variables = z.free_symbols
    if power == 1:
        return coefficient, sp.S.Zero, None
    if power == 1 / m and len(variables) == 1:
        a, = variables
        if sp.degree(z, a) == 1 and coefficient.is_polynomial(a) and sp.degree(coefficient, a) >= 1:
            s, r = sp.div(coefficient, z, a)
            ratio = sp.simplify(r / s) if s != 0 else None
            if ratio is not None and ratio.is_Number:
                return s * sp.sign(z), r * power, 2 * abs(ratio)
    return sp.S.Zero, coefficient * power, None


def _magnitude_ratio(e):
    """N/D -> (N/|z|**k)/(D/|z|**k) for N and D polynomials of the same degree k in |z|, with
    z**2 read as |z|**2 (z real): each coefficient becomes a bounded ratio ((1 - a)/|a - 2|)
    and each power of |z| a quotient (x**2/|z|), where N and D alone over- or underflow as
    |z|**k does (|alpha - 2|**3 at alpha = -1e100 overflows; their ratio is of order 1)."""
    if not isinstance(e, sp.Mul):
        return None
    for magnitude in sorted(e.atoms(sp.Abs), key=sp.default_sort_key):
        z = magnitude.args[0]
        if not z.is_real or z.is_Symbol:
            continue
        m = sp.Dummy("m", positive=True)
        rest = e.replace(lambda f: isinstance(f, sp.Pow) and f.base == z and f.exp.is_even, lambda f: m**f.exp)
        rest = rest.subs(magnitude, m)
        if rest.has(z) or not rest.has(m):
            continue
        scalable, others, total = [], [], 0
        for f in sp.Mul.make_args(rest):
            d = _polynomial_degree(f, m)
            if d is None:
                others.append(f)
            elif d != 0:
                scalable.append((f, d))
                total += d
            else:
                others.append(f)
        if total != 0 or len(scalable) < 2 or max(abs(d) for _, d in scalable) < 2:
            continue
        scaled = [_scaled_by(f, m, d, z) for f, d in scalable]
        result = sp.Mul(*others, *scaled).subs(m, magnitude)
        if result != e:
            return result


def _divides_by(term, base, nested: bool = True) -> bool:
    """True where ``term`` divides by a power of ``base``; with ``nested``, also where a sum
    among its factors holds such a term (at any depth)."""
    return any(isinstance(p, sp.Pow) and p.base == base and p.exp.is_negative
               or nested and isinstance(p, sp.Add) and any(_divides_by(t, base) for t in p.args)
               for p in sp.Mul.make_args(term))


def _divide_twice(e):
    """a/b**2 -> (a/b)/b: b**2 underflows (or overflows) long before a/b/b does."""
    if isinstance(e, sp.Mul):
        for f in e.args:
            if isinstance(f, sp.Pow) and f.exp == -2 and not f.base.is_Number:
                numerator = sp.Mul(*[g for g in e.args if g is not f])
                if numerator != 1 and not numerator.is_Number:
                    return group(numerator / f.base) / f.base


def _divide_in_turn(e):
    """a/(b*c) -> (a/b)/c for a non-numeric a: b*c under- or overflows where the quotients in
    turn need not (p/(q*(p + q)) at q = 1e-300). The first divisor is the sum that holds a
    factor of a, whose quotient is bounded (p/(p + q) <= 1 for p, q >= 0), else the first in
    SymPy's order."""
    if not isinstance(e, sp.Mul):
        return None
    coefficient, rest = e.as_coeff_Mul()
    factors = sp.Mul.make_args(rest)
    divisors = [f for f in factors if isinstance(f, sp.Pow) and f.exp == -1 and not f.base.is_Number]
    numerator = sp.Mul(*[f for f in factors if not any(f is d for d in divisors)])
    if len(divisors) < 2 or numerator == 1 or numerator.is_Number:
        return None
    own = sp.Mul.make_args(numerator)
    divisors.sort(key=lambda d: (not (isinstance(d.base, sp.Add) and any(f in d.base.args for f in own)),
                                 sp.default_sort_key(d)))
    quotient = numerator
    for d in divisors[:-1]:
        quotient = group(quotient * d)
    return coefficient * quotient * divisors[-1]


def _log_sum_exp(e):
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and len(e.args[0].args) == 2 \
            and all(isinstance(t, sp.exp) for t in e.args[0].args):
        a, b = (t.args[0] for t in e.args[0].args)
        return logaddexp(a, b)


def _x_log_y(e):
    """a*log(y) -> xlogy(a, y) and a*log1p(y) -> xlog1py(a, y): 0 where a = 0, not nan."""
    if isinstance(e, sp.Mul):
        for f in e.args:
            if isinstance(f, (sp.log, log1p)):
                coefficient, weight = sp.Mul(*[g for g in e.args if g is not f]).as_coeff_Mul()
                if weight != 1 and not weight.is_positive:
                    argument = f.args[0]
                    if isinstance(f, sp.log) and isinstance(argument, sp.Add) and sp.S.One in argument.args:
                        return coefficient * xlog1py(weight, argument - 1)  # log(1 + w): keep w's digits
                    function = xlogy if isinstance(f, sp.log) else xlog1py
                    return coefficient * function(weight, argument)


def _log_one_plus_exp(e):
    if isinstance(e, log1p) and isinstance(e.args[0], sp.exp):
        return softplus(e.args[0].args[0])
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and len(e.args[0].args) == 2 \
            and sp.S.One in e.args[0].args:
        other = e.args[0] - 1
        if isinstance(other, sp.exp):
            return softplus(other.args[0])


RULES: tuple[Rule, ...] = (
    Rule("sigmoid_complement", "1 - sigmoid(x)", "sigmoid(-x)", "sigmoid(x) rounds to 1 for x > 37", _one_minus_sigmoid),
    Rule("log_sigmoid", "log(sigmoid(x))", "-softplus(-x)", "sigmoid underflows to 0 for x < -745", _log_sigmoid),
    Rule("logistic", "1/(1 + exp(a))", "sigmoid(-a)", "exp overflows for a > 709", _logistic_fraction),
    Rule("logistic_ratio", "exp(a)*sigmoid(-a)", "sigmoid(a)", "exp(a)/(1 + exp(a)) is inf/inf for a > 709",
         _exp_times_sigmoid),
    Rule("logaddexp", "log(exp(a) + exp(b))", "logaddexp(a, b)", "exp overflows for a > 709", _log_sum_exp),
    Rule("softplus", "log(1 + exp(x))", "softplus(x)", "exp overflows for x > 709", _log_one_plus_exp),
    Rule("log1p", "log(1 + x)", "log1p(x)", "1 + x drops the digits of a small x", _log_one_plus),
    Rule("mixture_entropy", "xlogy(a, a) - xlogy(a, m) + xlogy(b, b) - xlogy(b, m), m = (a + b)/2",
         "m*(log1p(-t**2) + 2*t*atanh(t)), t = (a - b)/(a + b), where |t| < 1/2; "
         "else xlogy(a, 2a/(a + b)) + xlogy(b, 2b/(a + b))",
         "the four terms are of first order in a - b and cancel to the second-order value", _mixture_entropy),
    Rule("log_difference", "c*log(a) - c*log(b)", "c*log1p((a - b)/b) where a/b is in (1/2, 2)",
         "the logarithms of close values cancel to their rounding errors", _log_difference),
    Rule("power_minus_one", "c*a**k - c", "c*expm1(k*log(a))", "a**k rounds to 1 when k*log(a) is small",
         _power_minus_one),
    Rule("magnitude_ratio", "N/D, N and D of degree k in |z| (z**2 = |z|**2)", "(N/|z|**k)/(D/|z|**k)",
         "|z|**k over- or underflows for large or small |z| where the ratio of the scaled parts does not",
         _magnitude_ratio),
    Rule("power_of_one_plus", "(1 + w)**k", "exp(xlog1py(k, w))",
         "1 + w rounds w, and the k-th power multiplies that error by k", _power_of_one_plus),
    Rule("expm1", "c*exp(x) - c", "c*expm1(x)", "cancels to 0 for small x", _exp_minus_one),
    Rule("log1mexp", "log1p(-exp(u))", "log(-expm1(u)) where u > -log 2",
         "1 - exp(u) loses its digits where exp(u) is close to 1", _log_one_minus_exp),
    Rule("exprel", "expm1(a*u)/a", "u*exprel(a*u) where |a*u| <= 1",
         "a subnormal a*u keeps a few bits, which the quotient exposes", _expm1_over_factor),
    Rule("log1prel", "m*log1p(q/m)", "q*log1prel(q/m) where |q/m| <= 1",
         "a subnormal q/m keeps a few bits, which the product with m exposes", _log1p_of_quotient),
    Rule("logcosh", "log(cosh(x))", "logcosh(x)", "cosh overflows for |x| > 710; log(1 + tiny) cancels", _log_cosh),
    Rule("tanh", "sinh(x)**k/cosh(x)**k", "tanh(x)**k", "sinh and cosh overflow for |x| > 710, their ratio does not", _sinh_over_cosh),
    Rule("pythagoras", "cosh(x)**2 - sinh(x)**2", "1", "two huge nearly equal terms cancel", _cosh2_minus_sinh2),
    Rule("sech2", "1 - tanh(x)**2", "cosh(x)**-2", "tanh(x) rounds to 1 for |x| > 19", _one_minus_tanh2),
    Rule("hypot", "(x**2 + y**2)**(k/2)", "hypot(x, y)**k", "x**2 overflows for |x| > 1.3e154", _hypot),
    Rule("sqrt1pm1", "sqrt(1 + u) - 1", "u/(sqrt(1 + u) + 1)", "cancels to 0 for small u", _sqrt_one_plus_minus_one),
    Rule("heaviside_select", "Heaviside(u)*X", "X if u > 0, else 0", "0*inf is nan; the unselected branch may overflow",
         _heaviside_select),
    Rule("exp_product", "b*exp(a)", "sign(b)*exp(a + log|b|) for a > 700, b = N/D computed first",
         "exp(a) overflows where b*exp(a) need not; so does exp(a)*N where exp(a)*(N/D) need not",
         _exp_times_factor),
    Rule("combine_powers", "b**g/b", "b**(g - 1)", "b**g/b is 0/0 where b underflows", _combine_powers),
    Rule("distribute_to_cancel", "x*(a/x + b), also x*(c*(a/x + b) + d)", "a + x*b, c*(a + x*b) + x*d",
         "x*(a/x) is 0*inf = nan where x underflows",
         _distribute_to_cancel),
    Rule("power_log_domain", "b*B**e, e may be < 0, B and b vanishing together (sigmoid, softplus, exp)",
         "sign(b)*exp(e*log(B) + log|b|) where B < 1e-100, each log in a stable form",
         "B**e is inf where B underflows, and 0*inf = nan with the factor b that vanishes with B",
         _power_in_log_domain),
    Rule("divide_twice", "a/b**2", "(a/b)/b", "b**2 under- or overflows where a/b/b does not", _divide_twice),
    Rule("divide_in_turn", "a/(b*c)", "(a/b)/c", "b*c under- or overflows where a/b/c does not", _divide_in_turn),
    Rule("weighted_squares", "a*u**2 + b*v**2, a*b < 0, |b| <= |a|, a + b simpler",
         "(a + b)*u**2 + b*(v - u)*(v + u), Abs in a, b resolved by sign",
         "the two terms, each rounded (v**2 twice), cancel where a*u**2 is close to -b*v**2", _weighted_squares),
    Rule("angle_through_acos", "cos(a + acos(x)), sin(a + acos(x)), with the powers of 1 - x**2 beside them",
         "x*cos(a) - sqrt(q)*sin(a), sqrt(q)*cos(a) + x*sin(a), q = (1 - x)*(1 + x), expanded in q",
         "acos(x) near pi keeps only its rounding beside pi; the derivatives' terms in q cancel",
         _angle_through_acos),
    Rule("difference_of_squares", "a**2 - b**2 (also 1 - x**2)", "(a - b)*(a + b)",
         "a**2 - b**2 cancels when a is close to b", _difference_of_squares),
    Rule("multilinear_corners", "a polynomial of degree <= 1 in each of its variables v in [0, 1], "
         "e.g. alpha*y - alpha/2 - y/2 + 1/2",
         "sum over corners c of p(c)*prod(v or 1 - v), e.g. (alpha*y + (1 - alpha)*(1 - y))/2, "
         "where the corner values p(c) have one sign",
         "the monomials cancel where the value is small (y/2 at alpha = 1 is 0 at y = 1e-300); "
         "the corner terms all have its sign", _multilinear_corners),
    Rule("exact_sum", "a + b + c + ...", "exact_sum(a, b, c, ...)",
         "any order of the additions can cancel a small term away", _sum_of_atoms),
    Rule("collect_pair", "a*F + b*F + ...", "(a + b)*F + ...", "large a*F and b*F cancel in any order of the sum",
         _collect_pair),
    Rule("hypot_minus_one", "hypot(1, u) - 1", "u*(u/(hypot(1, u) + 1))", "cancels for small u, overflows for huge u",
         _hypot_one_minus_one),
    Rule("xlogy", "a*log(y)", "xlogy(a, y)", "0*log(0) is nan; the limit, and the loss, is 0", _x_log_y),
)

# --- products with a parameter that may be 0 ------------------------------------------------

_ZERO_PARAMETERS: ContextVar[frozenset] = ContextVar("zero_parameters", default=frozenset())


def zero_parameters(spec) -> frozenset:
    """The symbols of ``spec``'s parameters whose domain holds 0 (rule parameter_first)."""
    return frozenset(spec.symbols[p.name] for p in spec.params if DOMAINS[p.domain].contains(0.0))


def parameters_at_zero(symbols):
    """Within this context, rule parameter_first takes ``symbols`` as the parameters that may
    be 0 (or tiny)."""
    return _symbols_known(_ZERO_PARAMETERS, symbols)


@contextmanager
def spec_domains(spec):
    """What the rules may assume of ``spec``'s symbols: its [0, 1] inputs and parameters
    (``unit_interval``) and its parameters that may be 0 (``parameters_at_zero``)."""
    with unit_interval(unit_interval_symbols(spec)), parameters_at_zero(zero_parameters(spec)):
        yield


def _overflow_degree(f, parameters):
    """How many times a factor of ``f`` multiplies or divides by a base that depends on more
    than parameters and numbers, and on no function but Abs: w**2 and ((y/p)/p) twice (either
    can overflow where the base is huge or tiny), y/p once; a sum, its most; 0 inside any
    other function, and for a positive power of a polynomial in [0, 1] variables ((1 - 2*y)**2,
    bounded; see ``unit_interval``)."""
    if isinstance(f, sp.Pow):
        if f.exp.is_Number and not 0 < f.exp < 1 and not f.base.is_Number \
                and f.base.free_symbols - parameters - {ROW_SIZE} and _polynomial_base(f.base) \
                and (f.exp < 0 or not f.base.free_symbols <= _UNIT_SYMBOLS.get() | parameters):
            return abs(f.exp)
        return 0
    if isinstance(f, sp.Mul):
        return sum(_overflow_degree(a, parameters) for a in f.args)
    if isinstance(f, group):
        return _overflow_degree(f.args[0], parameters)
    if isinstance(f, sp.Add):
        return max(_overflow_degree(a, parameters) for a in f.args)
    return 0


def _polynomial_base(base) -> bool:
    """A base free of functions other than Abs (w, p, 1 - p, sum(p) + smooth): any size.
    sigmoid(x)**2 and the like are bounded and only underflow, which 0*c does not harm."""
    return not any(not isinstance(f, sp.Abs) for f in base.atoms(sp.Function))


def _in_turn(coefficient, x, parameters):
    """coefficient*x with the coefficient multiplied first, then x's other factors, and then
    each power that can overflow applied in turn, one factor of its base at a time (w**2 as
    *w*w, (y/p)/p as y, /p, /p); a sum in x term by term. None where nothing changes."""
    if isinstance(x, sp.Add):
        terms = [_in_turn(coefficient, t, parameters) for t in x.args]
        if all(t is None for t in terms):
            return None
        return sp.Add(*[coefficient * t if u is None else u for t, u in zip(x.args, terms)])
    if _overflow_degree(x, parameters) < 2:
        return None
    factors, stack = [], list(sp.Mul.make_args(x))
    while stack:
        f = stack.pop(0)
        if isinstance(f, group) and isinstance(f.args[0], sp.Mul):
            stack = list(f.args[0].args) + stack
        else:
            factors.append(f)
    powers = [f for f in factors if isinstance(f, sp.Pow) and _overflow_degree(f, parameters)]
    sums = [f for f in factors if isinstance(f, (sp.Add, group)) and _overflow_degree(f, parameters)]
    rest = sp.Mul(*[f for f in factors if not any(f is g for g in powers + sums)])
    if sums:  # (a sum that overflows)*..., as c*rest*sum in turn
        if len(sums) != 1 or powers:
            return None
        inner = sums[0].args[0] if isinstance(sums[0], group) else sums[0]
        return _in_turn(coefficient * rest, inner, parameters)
    value = coefficient * rest
    for power in powers:
        steps = [power.base ** sp.sign(power.exp)] * abs(int(power.exp)) if power.exp.is_Integer else [power]
        for step in steps:
            value = (value if value.is_Atom else group(value)) * step
    return value


def _parameter_first(e):
    """c*X, c a parameter that may be 0 and X holding powers that can overflow (w**2, 1/p**2)
    -> finite_or(c*X, c first, then X's factors one at a time) (lambda2*w**2 -> (lambda2*w)*w;
    alpha*y/p**2 -> ((alpha*y)/p)/p). At c = 0 the product in turn is 0 where c*X is 0*inf =
    nan; at a tiny c, (c*w)*w is finite where w**2 overflows. Where c*X is finite it is kept,
    since the order in turn could underflow where it does not (c*w tiny, w huge)."""
    parameters = _ZERO_PARAMETERS.get()
    if not parameters or not isinstance(e, sp.Mul):
        return None
    coefficient = sp.Mul(*[f for f in e.args if f in parameters
                           or isinstance(f, sp.Pow) and f.base in parameters and f.exp.is_positive])
    if coefficient == 1:
        return None
    number, rest = (e / coefficient).as_coeff_Mul()
    ordered = _in_turn(number * coefficient, rest, parameters)
    return None if ordered is None else finite_or(e, ordered)


# Applied once, top-down, to each finished output (apply_last): a product it rewrites is not
# visited again, and no rule of RULES sees its result.
LAST_RULES: tuple[Rule, ...] = (
    Rule("parameter_first", "c*X, c a parameter whose domain holds 0, X with powers w**2, 1/p**2 (or (y/p)/p)",
         "c*X where finite, else (c*w)*w, ((c*y)/p)/p: the coefficient first, then each factor in turn",
         "0*inf is nan where X overflows at c = 0 (the truth is 0), and X overflows at a tiny c "
         "where c*X need not", _parameter_first),
)


def apply_last(expr, rules: tuple[Rule, ...] = LAST_RULES):
    """``expr`` with each rule of ``rules`` applied once, outermost match first; conditions
    of a Piecewise are left as they are."""
    if not isinstance(expr, sp.Expr):
        return expr
    for rule in rules:
        replacement = rule.rewrite(expr)
        if replacement is not None:
            return replacement
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*[(apply_last(value, rules), condition) for value, condition in expr.args])
    if not expr.args or isinstance(expr, (sp.Symbol, sp.Number)):
        return expr
    args = [apply_last(a, rules) for a in expr.args]
    return expr if all(a is b for a, b in zip(args, expr.args)) else expr.func(*args, evaluate=False) \
        if isinstance(expr, (sp.Add, sp.Mul, sp.Pow)) else expr.func(*args)


MAX_PASSES = 8
SECOND_PASS_ONLY = {"heaviside_select"}  # tidying would factor the selected X back out
BEFORE_LOG_DOMAIN = tuple(r for r in RULES if r.name != "power_log_domain")  # see stabilise_derivation


def stabilise(expr: sp.Expr, rules: tuple[Rule, ...] = RULES, resolve: bool = True) -> sp.Expr:
    """Apply ``rules`` bottom-up until the expression stops changing; with ``resolve``, the
    log-domain products (rule power_log_domain) then take their placeholders' places."""
    for _ in range(MAX_PASSES):
        before = expr
        for rule in rules:
            expr = bottom_up(expr, lambda e, rewrite=rule.rewrite: _or_same(rewrite, e))
        if expr == before:
            break
    return resolve_log_domain(expr) if resolve else expr


# --- splits: cancellation between terms of a sum ----------------------------------------

Decomposition = Callable[[sp.Expr], tuple[sp.Expr, sp.Expr]]  # a -> (big part, small part)


@dataclass(frozen=True)
class Split:
    function: type
    positive: Optional[Decomposition]  # f(a) for a > threshold
    middle: Optional[Decomposition]    # f(a) for |a| <= threshold
    reason: str
    threshold: float = 1.0


SPLITS: tuple[Split, ...] = (
    Split(softplus, lambda a: (a, softplus(-a)), lambda a: (sp.log(2) + a / 2, logcosh(a / 2)),
          "softplus(x) = x + softplus(-x): the x cancels exactly against -y*x"),
    Split(sigmoid, lambda a: (sp.S.One, -sigmoid(-a)), lambda a: (sp.S.Half, sp.tanh(a / 2) / 2),
          "sigmoid(x) = 1 - sigmoid(-x) = 1/2 + tanh(x/2)/2: the 1 or 1/2 cancels exactly against y"),
    Split(sp.exp, None, lambda a: (sp.S.One, expm1(a)),
          "exp(x) = 1 + expm1(x) near 0: the 1 cancels exactly against other terms near 1"),
)

SPLIT_MAX_TERMS = 12
SPLIT_MAX_OPS = 300  # products of split functions are distributed: keep that bounded
# split arguments per sum: each branch of the first split is split again over a second
# argument (softplus(z)*(sigmoid(x) - y)); each level triples the branches
SPLIT_MAX_ARGUMENTS = 2


def _group_big_parts(expr: sp.Expr) -> sp.Expr:
    """Sum the big parts first, each set as one exact group, then add the rest.

    A term is a polynomial part (inputs, parameters, numbers) times a function part (the
    factors with a function call or a branch). The terms with no function part make one
    group; so do the terms that share a function part F, as F*group(sum of their polynomial
    parts): under a common factor, F - y*F cancels where F*(1 - y) does not (the splits of a
    focal loss, all under (1 - p_t)**gamma)."""
    # distribute each top-level term, but not inside nested branches
    terms = [u for t in sp.Add.make_args(expr) for u in sp.Add.make_args(sp.expand_mul(t, deep=False))]
    by_factor: dict = {}
    for t in terms:
        factors = sp.Mul.make_args(t)
        function_part = sp.Mul(*[f for f in factors if f.has(sp.Function, sp.Piecewise)])
        polynomial_part = sp.Mul(*[f for f in factors if not f.has(sp.Function, sp.Piecewise)])
        by_factor.setdefault(function_part, []).append(polynomial_part)
    out = []
    for function_part, parts in by_factor.items():
        if function_part != 1 and len(parts) < 2:
            out.append(function_part * parts[0])
            continue
        big = stabilise(sp.factor_terms(sp.Add(*parts)), GROUP_RULES)
        if big.has(sp.Add):  # also c*(a + b): SymPy would distribute c back into the sum
            big = group(big)
        out.append(function_part * big)
    return sp.Add(*out)


def _split_sum(expr, done: tuple = (), known: dict | None = None):
    """A sum as a Piecewise over the sign of a split function's argument a, each branch with
    the big parts grouped. Every split with the same threshold applies at once to the functions
    of a (softplus(x) and sigmoid(x) in one sum, as in the focal loss's gradient); each
    branch is split again over the next argument, up to ``SPLIT_MAX_ARGUMENTS`` of them. ``known``:
    in an output's own sum, the interval of each argument split on the way there ({} at the top;
    None inside another expression, see :func:`split_cancellations`)."""
    if not isinstance(expr, sp.Add) or len(expr.args) > SPLIT_MAX_TERMS or len(done) >= SPLIT_MAX_ARGUMENTS:
        return None
    if sp.count_ops(expr) > SPLIT_MAX_OPS:
        return None
    for split in SPLITS:
        for atom in sorted(expr.atoms(split.function), key=sp.default_sort_key):
            a = -atom.args[0] if atom.args[0].could_extract_minus_sign() else atom.args[0]
            if a in done:
                continue
            branches = _split_branches(expr, split, a, known)
            if branches:
                # all replacements first, then the big parts grouped once, in each innermost branch
                branches = [(_split_sum(e, done + (a,), None if known is None else {**known, a: region})
                             or _group_big_parts(e), c) for e, c, region in branches]
                return sp.Piecewise(*branches, (expr, True))
    return None


# the range of a function over every real argument, for _interval
FUNCTION_RANGES = {
    softplus: (0, "inf"),
    sigmoid: (0, 1),
    logcosh: (0, "inf"),
    sp.exp: (0, "inf"),
    sp.Abs: (0, "inf"),
}


def _interval(e: sp.Expr, known: dict):
    """An interval (mpmath.iv) holding every value of ``e`` where each symbol of ``known`` lies
    in its interval, a [0, 1] symbol (``unit_interval``) in [0, 1], a nonnegative one in
    [0, inf], any other in [-inf, inf], a function of ``FUNCTION_RANGES`` in its range; None for
    another function of a variable. Outward rounding, and dependencies between factors ignored:
    the interval may be wider than the range, never narrower."""
    if e in known:
        return known[e]
    if type(e) in FUNCTION_RANGES and e.free_symbols:
        return iv.mpf(list(FUNCTION_RANGES[type(e)]))
    if e.is_Symbol:
        return iv.mpf([0, 1]) if e in _UNIT_SYMBOLS.get() else iv.mpf([0, "inf"]) if e.is_nonnegative \
            else iv.mpf(["-inf", 0]) if e.is_nonpositive else iv.mpf(["-inf", "inf"])
    if e.is_Rational:
        return iv.mpf(int(e.p)) / int(e.q)
    if not e.free_symbols:
        value = iv.mpf(str(sp.N(e, 30)))  # a constant such as log(2): 30 digits, then widened
        return value * iv.mpf(["0.99999999999999", "1.00000000000001"])
    if isinstance(e, (sp.Add, sp.Mul)):
        parts = [_interval(arg, known) for arg in e.args]
        if any(part is None for part in parts):
            return None
        total = parts[0]
        for part in parts[1:]:
            total = total + part if isinstance(e, sp.Add) else total * part
        return total
    if isinstance(e, sp.Pow) and e.exp.is_Integer and e.exp > 0:
        base = _interval(e.base, known)
        return None if base is None else base ** int(e.exp)
    return None


def _one_sign(terms: list, known: dict) -> bool:
    """Whether ``terms`` are all >= 0 or all <= 0 while each split argument of ``known`` lies in
    its interval (the inputs in their domains): then they do not cancel, and that branch of a
    split gains nothing. (Binary cross-entropy's (1 - y)(log 2 + x/2) + y (log 2 - x/2) for
    |x| <= 1 and y in [0, 1]: without the split, a vectorised kernel skips a logcosh.)"""
    intervals = [_interval(t, known) for t in terms]
    if any(i is None for i in intervals):
        return False
    return all(i.a >= 0 for i in intervals) or all(i.b <= 0 for i in intervals)


def _split_branches(expr, split: Split, a: sp.Expr, known: dict | None = None) -> list:
    """(branch expression, condition, interval of a) for each side of ``split``'s threshold in ``a`` where
    splitting helps: at least two big parts meet in the sum and may differ in sign. The branch
    expression has the functions of ``a`` replaced by their big and small parts, not yet grouped."""
    companions = [s for s in SPLITS if s.threshold == split.threshold
                  and (expr.has(s.function(a)) or expr.has(s.function(-a)))]
    related = {s: [f for f in (s.function(a), s.function(-a)) if expr.has(f)] for s in companions}
    everything = [f for fs in related.values() for f in fs]
    branches = []
    t = split.threshold
    for condition, part, sign, region in ((a > t, "positive", 1, iv.mpf([t, "inf"])),
                                          (sp.Abs(a) <= t, "middle", 0, iv.mpf([-t, t])),
                                          (a < -t, "positive", -1, iv.mpf(["-inf", -t]))):
        replacements, bigs = {}, {}
        for s in companions:
            decompose = getattr(s, part)
            if decompose is None:
                continue
            for f in ([s.function(sign * a)] if sign else related[s]):
                if f in related[s]:
                    big, small = decompose(f.args[0])
                    replacements[f], bigs[f] = big + small, big
        meeting = [t for t in expr.args if not t.has(*everything) or any(t.has(f) and bigs[f] != 0 for f in bigs)]
        same_sign = all(t.xreplace(bigs).is_positive for t in meeting) or \
            all(t.xreplace(bigs).is_negative for t in meeting) or \
            (known is not None and _one_sign([u.xreplace(bigs) for u in meeting], {**known, a: region}))
        if replacements and len(meeting) >= 2 and not same_sign:
            branches.append((expr.xreplace(replacements), condition, region))
    return branches


def _constant_minus_product(e):
    """c + a*b (c a number, or a sum of inputs and numbers; a*b one product) -> fma(a, b, c):
    the product is not rounded, and c (1 - epsilon, say) is summed exactly first."""
    terms = _add_terms(e)
    if not terms:
        return None
    products = [t for t in terms if not _signed_atom(t)]
    rest = [t for t in terms if _signed_atom(t)]
    if len(products) != 1 or not rest or not isinstance(products[0], sp.Mul):
        return None
    c = rest[0] if len(rest) == 1 else (exact_sum(*sorted(rest, key=sp.default_sort_key)) if len(rest) > 2
                                        else sp.Add(*rest))
    if len(rest) == 1 and not rest[0].is_Number:
        return None  # x + a*b rounds once either way
    coefficient, product = products[0].as_coeff_Mul()
    factors = sp.Mul.make_args(product)
    if any(f.is_Number for f in factors):
        return None
    if len(factors) == 1 and abs(coefficient) != 1:
        return fma(coefficient, factors[0], c)  # 3*b - 1: 3*b rounds
    if len(factors) >= 2:
        return fma(coefficient * factors[0], sp.Mul(*factors[1:]), c)


FMA_RULE = Rule("fma", "c + a*b", "fma(a, b, c)", "a*b rounds away the digits that survive c + a*b",
                _constant_minus_product)
# the rules for a group of big parts (_group_big_parts): a multilinear sum in [0, 1] takes
# its corner form, a sum of atoms (1 - alpha - y) is summed exactly, c + a*b is one fma
GROUP_RULES = tuple(r for r in RULES if r.name in ("multilinear_corners", "exact_sum")) + (FMA_RULE,)


def split_cancellations(expr: sp.Expr) -> sp.Expr:
    """Apply ``SPLITS`` to every sum, bottom-up. The output's own sum (``known`` = {}) also drops a
    branch whose big parts keep one sign there (:func:`_one_sign`); a sum inside another
    expression keeps it, since its exact big parts may still cancel against what it meets
    further up (poly1's y sigmoid(-x) + (1 - y) sigmoid(x) inside 1 - p_t: dropped, its
    gradient's worst error went from 1.2e-14 to 1.9e-14)."""
    if not isinstance(expr, sp.Add):
        return bottom_up(expr, lambda e: _or_same(_split_sum, e))
    expr = sp.Add(*[bottom_up(arg, lambda e: _or_same(_split_sum, e)) for arg in expr.args])
    return _or_same(lambda e: _split_sum(e, known={}), expr)


# --- asymptotic inversion: overflow of powers of a huge variable --------------------------

HUGE = 1e60  # beyond this |v|, v**4 would be close to overflow; 1/v is exact enough


def _log_expanded(arg: sp.Expr, small: list) -> sp.Expr:
    """log(arg) for arg > 0 as a sum of logs of its factors: log(N) - log(D), with
    log(f**k) = k log|f| and log(1 + u) = log1p(u), so no factor over- or underflows.
    Each such u is appended to ``small``: the sum is accurate only where |u| <= 1, since
    log(1 + 1/w) = log1p(w) - log(w) cancels to log1p(1/w) where w is large."""
    numerator, denominator = sp.fraction(sp.together(arg))

    def of_product(m):
        total = sp.S.Zero
        for base, k in m.as_powers_dict().items():
            if base.is_Number:
                total += k * sp.log(base)
            elif isinstance(base, sp.Add) and sp.S.One in base.args:
                small.append(base - 1)
                total += k * log1p(base - 1)
            else:
                total += k * sp.log(base if base.is_positive else sp.Abs(base))
        return total

    return of_product(numerator) - of_product(denominator)


def _overflow_prone(expr: sp.Expr, v: sp.Symbol) -> bool:
    """True if a power >= 2 of a polynomial in v appears (v**2 overflows for |v| > 1.3e154)."""
    return any(isinstance(e, sp.Pow) and e.exp.is_number and abs(e.exp) >= 2 and e.base.has(v)
               and e.base.is_polynomial(v) for e in sp.preorder_traversal(expr))


def invert_for_huge(expr: sp.Expr, variable: sp.Expr, solve_for: sp.Symbol) -> Optional[tuple[sp.Expr, sp.Basic]]:
    """(``expr`` rewritten in t = 1/variable, where it holds beside |variable| > HUGE), or None
    where that form would still divide by t (so would overflow too) or ``expr`` is not a
    function of the variable alone. The condition is |u| <= 1 for each log1p(u) of a log
    taken apart (see _log_expanded): Barron's log((x/c)**2/|alpha - 2| + 1) is
    log1p(|alpha - 2| c**2 t**2) - log|alpha - 2| - 2 log c - 2 log|t|, whose terms cancel where
    |alpha - 2| >> x**2 (alpha = -1e300 at x = 1e100); there the direct form is exact."""
    v, t = sp.Dummy("v", real=True), sp.Dummy("t", real=True)
    solved = sp.solve(sp.Eq(variable, v), solve_for)
    if len(solved) != 1 or expr.has(sp.Piecewise):
        return None
    in_v = expr.subs(solve_for, solved[0])
    if in_v.free_symbols & (variable.free_symbols - {s for s in variable.free_symbols if s.is_positive}) \
            or not _overflow_prone(in_v, v):
        return None
    inverted, small = in_v.subs(v, 1 / t), []
    inverted = inverted.replace(lambda e: isinstance(e, (sp.log, log1p)),
                                lambda e: _log_expanded(e.args[0] if isinstance(e, sp.log) else 1 + e.args[0], small))
    # a symbolic power B**k of a huge B: exp(k*log(B)), with log(B) expanded as above; the
    # exponent is a group, which the simplifications below treat as one opaque symbol
    inverted = inverted.replace(lambda e: isinstance(e, sp.Pow) and not e.exp.is_Number and e.base.has(t),
                                lambda e: sp.exp(group(sp.expand(e.exp * _log_expanded(e.base, small)))))
    opaque = {g: sp.Dummy() for g in inverted.atoms(group)}
    inverted = inverted.xreplace(opaque)
    inverted = sp.cancel(sp.together(inverted)) if not inverted.has(sp.log, log1p) else sp.expand(inverted)
    if opaque:  # keep factors such as (alpha - 1) whole: expanded, they cancel near alpha = 1
        inverted = _factor_in_magnitudes(inverted)
    inverted = _powers_into_exponent(inverted, t, opaque).xreplace({d: g for g, d in opaque.items()})
    for e in sp.preorder_traversal(inverted):  # every divisor must stay finite and non-zero at t = 0
        if isinstance(e, sp.Pow) and e.exp.is_negative and e.base.has(t) and not _inside_log(inverted, e):
            at_zero = e.base.subs(t, 0)
            if not at_zero.is_finite or at_zero.is_zero is not False and not at_zero.free_symbols:
                return None  # |alpha - 2| may vanish, but only at a parameter value, as in the direct form
    where = sp.And(*[sp.Abs(u) <= 1 for u in sorted(set(small), key=sp.default_sort_key)])
    back = {t: group(1 / variable)}  # t stays 1/v, never v**-2
    return stabilise(inverted).xreplace(back), where.xreplace(back)


def _factor_in_magnitudes(expr: sp.Expr) -> sp.Expr:
    """sp.factor, with each |z| (z linear in one parameter a) read as a magnitude m and a as
    a function of z, so that z**2 = m**2: Barron's |alpha - 2| alpha**2 + 4 |alpha - 2| (1 - alpha)
    is the m**3 it is, and its Hessian's denominator the square m (m c**2 t**2 + 1)**2, whose
    factors stay finite where the expanded sum meets inf*0 (alpha**2 t**4 at alpha = -1e300)."""
    for magnitude in sorted(expr.atoms(sp.Abs), key=sp.default_sort_key):
        z = magnitude.args[0]
        if z.is_Symbol or len(z.free_symbols) != 1 or not z.is_polynomial(*z.free_symbols) \
                or sp.degree(z, *z.free_symbols) != 1:
            continue
        a, = z.free_symbols
        w, m = sp.Dummy("w", real=True), sp.Dummy("m", positive=True)
        in_w = sp.expand(expr.subs(magnitude, m).subs(a, sp.solve(sp.Eq(z, w), a)[0]))
        if in_w.has(a):
            continue
        in_w = in_w.replace(lambda f: isinstance(f, sp.Pow) and f.base == w and f.exp.is_Integer and f.exp >= 2,
                            lambda f: m ** f.exp if f.exp % 2 == 0 else w * m ** (f.exp - 1))
        expr = sp.factor(in_w).xreplace({m: magnitude}).subs(w, z)
    return sp.factor(expr)


def _powers_into_exponent(expr: sp.Expr, t: sp.Symbol, opaque: dict) -> sp.Expr:
    """t**j*|a|*exp(G)*R -> sign(t)**j*exp(group(G + j*log|t| + log|a|))*R, for one exp(G)
    whose exponent is an opaque group (``opaque``: group -> its placeholder) and factors |a|
    of the parameters: where exp(G) overflows (or underflows), the product with t**j and |a|
    need not (Barron's gradient at alpha = 2 + 1e-8, where |alpha - 2| = 1e-8 and
    exp(G) = 1e308/1e-8). The log|t| and log|a| terms are collected, so (2 - alpha)*log|t|
    is computed, not the difference of two large numbers."""
    numerator, denominator = (sp.factor_terms(part) for part in sp.fraction(expr))
    placeholders = {d: g for g, d in opaque.items()}
    exps = [f for f in sp.Mul.make_args(numerator) if isinstance(f, sp.exp) and f.args[0] in placeholders]
    j = numerator.as_powers_dict().get(t, 0) - denominator.as_powers_dict().get(t, 0)
    absorbed = [f for f in sp.Mul.make_args(numerator) if isinstance(f, sp.Abs) and not f.has(t)]
    if len(exps) != 1 or not j.is_Integer or (j == 0 and not absorbed):
        return expr
    log_t = sp.log(sp.Abs(t))
    logs = [sp.log(f) for f in absorbed]
    exponent = sp.collect(sp.expand(placeholders[exps[0].args[0]].args[0] + j * log_t + sp.Add(*logs)),
                          [log_t, *logs])
    rest = numerator / (exps[0] * t ** numerator.as_powers_dict().get(t, 0) * sp.Mul(*absorbed)) \
        / (denominator / t ** denominator.as_powers_dict().get(t, 0))
    return sp.sign(t) ** (j % 2) * sp.exp(group(exponent)) * rest


def _inside_log(root, node) -> bool:
    return any(isinstance(e, (sp.log, log1p)) and e.has(node) for e in sp.preorder_traversal(root))


def scale_variables(spec) -> list[tuple[sp.Expr, sp.Symbol]]:
    """(variable, prediction it can be solved for): the spec's let bindings that are linear in
    the inputs (residuals such as p - y), then each prediction itself."""
    inputs = [spec.symbols[i.name] for i in spec.inputs]
    found = []
    for _, value in spec.lets:
        for p in spec.predictions:
            symbol = spec.symbols[p.name]
            if value.has(symbol) and value.is_polynomial(*inputs) \
                    and all(sp.degree(value, s) <= 1 for s in inputs if value.has(s)):
                found.append((value, symbol))
                break
    return found + [(spec.symbols[p.name], spec.symbols[p.name]) for p in spec.predictions]


def rewritten(expr: sp.Expr, rules: tuple[Rule, ...] = RULES) -> sp.Expr:
    """Rules, tidying, rules again (with the second-pass rules).

    The rules run twice around a tidying step: a rewrite such as 1 - sigmoid(x) -> sigmoid(-x)
    can reveal a factor that cancels (sigmoid(-x)/sigmoid(-x)), which tidying then removes."""
    return resolve_log_domain(_rewritten(expr, rules))


def _rewritten(expr: sp.Expr, rules: tuple[Rule, ...] = RULES) -> sp.Expr:
    """:func:`rewritten`, with the log-domain products still placeholders."""
    first_pass = tuple(r for r in rules if r.name not in SECOND_PASS_ONLY)
    return stabilise(tidy(stabilise(expr, first_pass, resolve=False)), rules, resolve=False)


def direct_form(expr: sp.Expr) -> sp.Expr:
    """The rewritten expression, with its cancelling sums split (a log-domain product's logs
    left as the rule wrote them)."""
    return resolve_log_domain(_log_domain_outermost(split_cancellations(_rewritten(expr))))


def _log_domain_outermost(expr: sp.Expr) -> sp.Expr:
    """One selection at the top, Piecewise((expr with every log-domain product, B < SMALL_BASE),
    (expr with none, True)), where every selection of rule power_log_domain in ``expr`` is on
    the same base B: the same values, but the kernels compute the logs only where B is small
    (a selection nested in a sum, or in the splits' branches, has them computed for every
    element)."""
    selections = [f for f in expr.atoms(sp.Piecewise) if f.args[0][0] in _LOG_DOMAIN]
    bases = {_LOG_DOMAIN_BASE[f.args[0][0]] for f in selections}
    if len(bases) != 1:
        return expr
    far = expr.xreplace({f: f.args[0][0] for f in selections})
    near = expr.xreplace({f: f.args[1][0] for f in selections})
    return sp.Piecewise((far, next(iter(bases)) < SMALL_BASE), (near, True))


def with_asymptote(raw: sp.Expr, stable: sp.Expr, spec) -> sp.Expr:
    """``stable``, with the asymptotic form of ``raw`` where a residual is huge, if it has one;
    branch by branch where both are Piecewise with the same conditions."""
    if isinstance(raw, sp.Piecewise) and isinstance(stable, sp.Piecewise) \
            and [c for _, c in raw.args] == [c for _, c in stable.args]:
        return sp.Piecewise(*[(with_asymptote(r, s, spec), c) for (r, c), (s, _) in zip(raw.args, stable.args)])
    for variable, prediction in scale_variables(spec):
        inversion = invert_for_huge(raw, variable, prediction)
        if inversion is not None:
            inverted, where = inversion
            return sp.Piecewise((inverted, (sp.Abs(variable) > HUGE) & where), (stable, True))
    return stable


def stabilise_output(expr: sp.Expr, spec) -> sp.Expr:
    """One output of a derivation: rules, splits, and an asymptotic branch where it applies."""
    return with_asymptote(expr, direct_form(expr), spec)


def _divisions(expr) -> int:
    return sum(1 for e in sp.preorder_traversal(expr) if isinstance(e, sp.Pow) and e.exp.is_negative)


def stabilise_derivation(derivation):
    """The derivation with every output stabilised (see the module docstring).

    A Hessian is the derivative of the raw gradient or of the rewritten one (exactly equal,
    since every rewrite is an identity): sigmoid(x)*sigmoid(-x)/(1 - sigmoid(x)) differentiates
    into a tangle, its rewritten form sigmoid(x) into sigmoid(x)*sigmoid(-x). The smaller
    stable form is kept: the one with fewer divisions (x*(a/x) is 0*inf where x underflows),
    then the shorter. Where SymPy cannot differentiate the rewritten gradient (the sign(b) of
    exp_product's far branch), the raw Hessian's stable form is the one. The gradient is
    differentiated as rewritten without rule power_log_domain (the derivative of its logs would
    divide by the factors that underflow); the rule applies to the derivative's own terms."""
    spec = derivation.spec
    with spec_domains(spec):
        stable = _stabilised(derivation, spec)
        return replace(stable, loss=apply_last(stable.loss), grad=tuple(map(apply_last, stable.grad)),
                       hess=tuple(map(apply_last, stable.hess)))


def _stabilised(derivation, spec):
    hessians = []
    for prediction, gradient, raw_hessian in zip(spec.predictions, derivation.grad, derivation.hess):
        candidates = [direct_form(raw_hessian)]
        try:
            candidates.append(direct_form(differentiate(rewritten(gradient, BEFORE_LOG_DOMAIN),
                                                         spec.symbols[prediction.name])))
        except ValueError:
            pass  # sign(b) of a rule's far branch has no derivative SymPy can write: the raw one stands
        best = min(candidates, key=lambda e: (_divisions(e), sp.count_ops(e), sp.default_sort_key(e)))
        hessians.append(with_asymptote(raw_hessian, best, spec))
    return replace(derivation, loss=stabilise_output(derivation.loss, spec),
                   grad=tuple(stabilise_output(g, spec) for g in derivation.grad), hess=tuple(hessians))


def _or_same(rewrite: Rewrite, e):
    replacement = rewrite(e) if isinstance(e, sp.Basic) else None
    return e if replacement is None else replacement
