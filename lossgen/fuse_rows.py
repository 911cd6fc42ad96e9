"""Cancellation across reductions: close row values, and fused sums.

The elementwise rules (:mod:`lossgen.stabilise`) see one element or one row expression at a
time; they cannot see that two row values are close. Dice, 1 - (2 sum(p y) + s)/(sum(p**2) +
sum(y**2) + s), is 1 - N/D with N and D equal to the last digit near a perfect prediction:
both the loss and the gradient 2 (N p_k - D y_k)/D**2 lose every digit. Two exact steps,
applied to the lowered loss before it is differentiated (so the gradient and the Hessian
follow the rewritten program by the chain rule), make that cancellation visible:

1. **Close pairs.** Two polynomials in row values u and v (in the same expression) whose
   difference d = u - v is shorter than they are (terms cancel symbolically: the smooth
   constant of Dice, C1 of SSIM) are close wherever d is small. In the smallest sum holding
   both, u and v become opaque names U and V; the terms of that sum made of U, V and
   constants are put over one denominator, and in its numerator only, U is written V + d and
   expanded: the numerator then holds d, not U and V (1 - N/D -> d/D). Each sum is rewritten
   for its own pairs, so SSIM's 1 - l + l (1 - cs), l = N1/A, cs = N2/B, becomes
   d1/A + l d2/B.
2. **Fused sums.** In d, each factor that is linear in sum reductions with numeric
   coefficients, sum_a c_a R_a, becomes one new reduction sum_k (sum_a c_a g_a(k)): one pass
   whose summand is combined and rewritten elementwise (see :func:`accurate_form`):
   sum(p**2) + sum(y**2) - 2 sum(p y) -> sum((p - y)**2). Each element's difference is then
   exact, and the derivative of the fused sum, 2 (p_k - y_k), is exact too. Every other sum
   of reductions with numeric coefficients and summands of both signs in the loss is fused
   alike (the union sum(p) + sum(y) - sum(p y) of Jaccard): its derivative is one element
   expression (1 - y), whose factor the Hessian's terms then share.

3. **Shares.** Where the numerator holds the differences of two or more pairs over their
   denominators' product (1 - N1 N2/(A B) = E/(A B), global SSIM), E/(A B) is written
   share(E, N1 N2, A B), whose derivative is (W E' - E W')/D**2 with W = N1 N2: the quotient
   rule's E' D - E D' cancels to nothing where the similarity N1 N2/(A B) is small (see
   :class:`share`). A single pair (1 - N/D = d/D, W = N: Dice, soft Jaccard, Tversky, the
   Dice term of combo) is gradient_share(d, N, D): its gradient is the share's (W d' - d W')/D**2,
   exact where N is small against D (no overlap, smooth = 0: Dice's 2 (p - y) D - 2 d p at y = 0
   left 2e-16/p where the truth is 0), and its Hessian the derivative of d/D (Dice's full
   Hessian at p = 0 needs that form; see :class:`gradient_share`).

4. **Close roots.** c sqrt(U) - c sqrt(V) for two sum reductions U, V whose summands' difference
   is shorter than they are (the norms |a - p + eps| and |a - n + eps| of the triplet loss share
   the anchor) is c (U - V)/(sqrt(U) + sqrt(V)), with U - V one fused sum (sum((n - p)(2a - p -
   n + 2 eps))): the difference of two norms keeps its digits where they are equal to many
   places (a row that mixes 1e10 and 1). Written root_difference(U, V, d), differentiated as the
   roots apart (see :class:`root_difference`), so the derivatives are those of the norms, which
   :mod:`lossgen.stabilise_rows` writes in the pair's accurate forms (close norms).

Nothing here names a loss: the table :data:`SUMMAND_FORMS` lists the candidate forms of a fused
summand, tried in order, and :func:`accurate` is the one test that picks among them.
"""
from __future__ import annotations

import itertools

import sympy as sp

MAX_PAIR_CANDIDATES = 12   # sums of row values considered for close pairs
MAX_OPS = 400              # row expressions larger than this are left alone


# --- the accuracy of an element expression ---------------------------------------------------

def _sign(term, unit: frozenset) -> int:
    """+1 or -1 when ``term`` is known >= 0 or <= 0 (inputs' assumptions; 1 - x >= 0 for x in
    [0, 1]), else 0."""
    sign = 1
    for factor in sp.Mul.make_args(term):
        if factor.is_Number:
            sign *= 1 if factor >= 0 else -1
        elif isinstance(factor, sp.Pow) and factor.exp.is_Integer and factor.exp % 2 == 0:
            continue
        elif isinstance(factor, sp.Pow) and _sign(factor.base, unit) == 1:
            continue
        elif factor.is_nonnegative:
            continue
        elif factor.is_nonpositive:
            sign = -sign
        elif isinstance(factor, sp.Add) and len(factor.args) == 2 and sp.S.One in factor.args \
                and (-(factor - 1)) in unit:
            continue  # 1 - x, x in [0, 1]
        else:
            return 0
    return sign


def _single_rounding(terms) -> bool:
    """a - b of two inputs (or numbers): one rounding of the exact difference."""
    return len(terms) == 2 and all(abs(t.as_coeff_Mul()[0]) == 1 and
                                   (t.as_coeff_Mul()[1].is_Symbol or t.as_coeff_Mul()[1].is_Number)
                                   for t in terms)


def accurate(expr: sp.Expr, unit: frozenset) -> bool:
    """Does every sum in ``expr`` add terms of one sign, or subtract two inputs (one rounding)?
    Then ``expr`` is computed to a few ulps wherever it is evaluated."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Add) and not _single_rounding(node.args):
            signs = {_sign(t, unit) for t in node.args}
            if 0 in signs or len(signs) > 1:
                return False
    return True


def _bernstein(expr: sp.Expr, unit: frozenset) -> sp.Expr | None:
    """A polynomial of degree <= 1 in each of its variables in [0, 1], written over the corners
    of the unit box: f = sum f(corner) prod(x or 1 - x). p + y - 2 p y = p (1 - y) + (1 - p) y:
    every term is >= 0 where every corner value is."""
    variables = sorted(expr.free_symbols, key=sp.default_sort_key)
    if not variables or not set(variables) <= unit or not expr.is_polynomial(*variables) \
            or any(sp.degree(expr, x) > 1 for x in variables) or len(variables) > 4:
        return None
    terms = []
    for corner in itertools.product((0, 1), repeat=len(variables)):
        value = expr.subs(dict(zip(variables, corner)))
        if value != 0:
            terms.append(value * sp.Mul(*[x if c else 1 - x for x, c in zip(variables, corner)]))
    return sp.Add(*terms)


# Candidate forms of a fused summand, in order of preference; the first accurate one is used.
SUMMAND_FORMS = (
    ("factored", lambda e, unit: sp.factor(e)),                 # p**2 + y**2 - 2 p y -> (p - y)**2
    ("corners", _bernstein),                                    # p + y - 2 p y -> p (1 - y) + (1 - p) y
    ("expanded", lambda e, unit: sp.expand(e)),
)


def accurate_form(summand: sp.Expr, unit: frozenset) -> sp.Expr:
    """The first accurate form of ``summand`` in :data:`SUMMAND_FORMS`, else its factored form."""
    for _, form in SUMMAND_FORMS:
        candidate = form(summand, unit)
        if candidate is not None and accurate(candidate, unit):
            return candidate
    return sp.factor(summand)


# --- the share of a close pair's difference ---------------------------------------------------

class share(sp.Function):
    """share(E, W, D) = E/D, where D = E + W: the part E of a sum D whose other part W is free of
    the differences (SSIM's 1 - N1 N2/(A B) = E/(A B) with W = N1 N2). It is differentiated as
    (W E' - E W')/D**2, the quotient rule with D' = E' + W' put in: the quotient rule's own
    E' D - E D' cancels to nothing where E is most of D (SSIM far from its target: N1 N2/(A B)
    = 2e-6 at a pixel row near 0), W E' - E W' does not (and where W is most of D, E and E' are
    small and W E' dominates). D itself is not differentiated (its partial is 0): D is E + W
    wherever the program is evaluated, so the total derivative is that of E/(E + W).
    :func:`expand_shares` writes E/D back after differentiation."""

    def fdiff(self, argindex=1):
        part, complement, total = self.args
        if argindex == 1:
            return complement / total**2
        if argindex == 2:
            return -part / total**2
        return sp.S.Zero


class gradient_share(share):
    """share(E, W, D) of a single close pair (Dice's 1 - N/D = d/D, W = N), differentiated as a
    share for the gradient only: (W d' - d W')/D**2 keeps its digits where the pair's difference d
    is most of D (no overlap: N tiny against D, smooth = 0), where the quotient rule's
    d' D - d D' subtracts terms of size D (at y = 0, p = 1 - 2**-53 and smooth = 0 Dice's gradient
    2 (p - y) D - 2 d p is 0 in exact arithmetic and 2e-16/p rounded; (W d' - d W') is
    2 (2 sum(p y)) (p - y) - 2 d y = 0 exactly). The Hessian is the derivative of the plain
    quotient d/D (:func:`hessian_forms`), the form its rules are written for
    (:func:`lossgen.stabilise_rows._total_less_own`: Dice's diagonal at y = (1, 1e-300), p = (1, 1)).
    Both are exact identities of the same loss."""


def hessian_forms(expr: sp.Expr) -> sp.Expr:
    """``expr`` in the forms its Hessian is derived from: every gradient_share(E, W, D) written
    E/D (see :class:`gradient_share`), and every share(E, W, D) kept where its part E is at most
    its complement W (the similarity W/D at least 1/2), written 1 - W/D where it is not. The
    share's second derivative holds the quotient-rule terms of E's pairs, d1/A and d2/B, which
    cancel to the small W/D far from the target (global SSIM at C = 1, x = 0, y = 1 - 2**-53:
    2 C1/A**2 = 2e-4 from terms of 2, relative error 6.6e-12); those of W/D = (N1/A)(N2/B) are of
    its size there (1.8e-16). Both are the same loss."""
    if not isinstance(expr, sp.Basic) or not expr.has(share):
        return expr
    expr = expr.replace(gradient_share, lambda part, complement, total: part / total)
    return expr.replace(lambda e: type(e) is share,
                        lambda e: sp.Piecewise((e, e.args[0] <= e.args[1]), (1 - e.args[1] / e.args[2], True)))


class root_difference(sp.Function):
    """root_difference(U, V, d) = sqrt(U) - sqrt(V), evaluated as d/(sqrt(U) + sqrt(V)) with
    d = U - V computed apart (a fused sum): an identity, free of the cancellation of two close
    roots. Differentiated as the roots apart, d/dU = 1/(2 sqrt(U)), d/dV = -1/(2 sqrt(V)), and
    0 for d (d is U - V wherever the program is evaluated): the quotient's own derivative,
    (d' (sqrt U + sqrt V) - d (sqrt U + sqrt V)')/(sqrt U + sqrt V)**2, cancels to first order
    where U and V are close. :func:`expand_shares` writes the quotient after differentiation."""

    def fdiff(self, argindex=1):
        u, v, _ = self.args
        if argindex == 1:
            return 1 / (2 * sp.sqrt(u))
        if argindex == 2:
            return -1 / (2 * sp.sqrt(v))
        return sp.S.Zero

    def _eval_is_real(self):
        return True


def expand_shares(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every share(E, W, D) written E/D, and every root_difference(U, V, d)
    d/(sqrt(U) + sqrt(V)), and 0 where U = V = 0 (two norms of 0: the quotient is 0/0 there,
    triplet_margin's d(a, p) - d(a, n) at a = p = n with eps = 0; their derivatives at 0 are
    stabilise_rows.at_zero_norm's)."""
    if not isinstance(expr, sp.Basic) or not expr.has(share, root_difference):
        return expr
    expr = expr.replace(root_difference, lambda u, v, d: sp.Piecewise((d / (sp.sqrt(u) + sp.sqrt(v)),
                                                                        sp.Or(u > 0, v > 0)), (0, True)))
    return expr.replace(share, lambda part, complement, total: part / total)


# --- close pairs and fused sums --------------------------------------------------------------

class Fuser:
    """Rewrites a lowered loss of a :class:`lossgen.derive_rows.RowProgram`."""

    def __init__(self, program, unit: frozenset):
        self.program, self.unit = program, unit

    def sums(self, expr) -> set:
        return {s for s in expr.free_symbols
                if s in self.program.reductions and self.program.reductions[s].kind == "sum"}

    # step 2
    def fuse(self, expr: sp.Expr) -> sp.Expr:
        """Every factor of ``expr`` linear in sum reductions (numeric coefficients, summands of
        both signs) as one fused sum."""
        if not self.sums(expr):
            return expr
        factored = sp.factor(expr)
        out = []
        for factor in sp.Mul.make_args(factored):
            base, exponent = (factor.base, factor.exp) if isinstance(factor, sp.Pow) else (factor, 1)
            out.append(self._fused_linear(base) ** exponent)
        return sp.Mul(*out)

    def _fused_linear(self, expr: sp.Expr) -> sp.Expr:
        sums = sorted(self.sums(expr), key=sp.default_sort_key)
        if len(sums) < 2 or not isinstance(expr, sp.Add):
            return expr
        coefficients = {}
        rest = []
        for term in expr.args:
            coefficient, symbol = term.as_coeff_Mul()
            if symbol in sums and symbol not in coefficients:
                coefficients[symbol] = coefficient
            else:
                rest.append(term)
        if len(coefficients) < 2:
            return expr
        summands = [c * self.program.reductions[s].summand for s, c in coefficients.items()]
        signs = {_sign(sp.factor(t), self.unit) for t in summands}
        if signs <= {1} or signs <= {-1}:
            return expr  # terms of one sign: no cancellation to fuse away
        combined = sp.expand(sp.Add(*summands))
        # inside the summand, row values may cancel too (mean(x) - mean(y) of SSIM)
        combined = self.fuse_inner(combined)
        form = accurate_form(combined, self.unit)
        sign = -1 if form.could_extract_minus_sign() else 1
        fused = self.program.intern("sum", sp.factor_terms(sign * form))
        return sign * fused + sp.Add(*rest)

    def fuse_inner(self, summand: sp.Expr) -> sp.Expr:
        """Sums of row values inside a summand (its factors), fused: the variance of x - y in
        SSIM, sum((x - y - mean(x) + mean(y))**2), has mean(x) - mean(y) = mean(x - y) inside."""
        if len(self.sums(summand)) < 2:
            return summand
        return self.fuse_sums(sp.factor(summand))

    # step 1
    def candidates(self, expr):
        return [node for node in sp.preorder_traversal(expr)
                if isinstance(node, sp.Add) and self.sums(node)][:MAX_PAIR_CANDIDATES]

    def close_pairs(self, expr):
        """(u, v, d = u - v) for sums u, v of row values whose difference cancels symbolically."""
        pairs = []
        values = list(self.program.reductions)
        for u, v in itertools.combinations(self.candidates(expr), 2):
            if _contains(u, v) or _contains(v, u) or not (u.is_polynomial(*values) and v.is_polynomial(*values)):
                continue  # (1 - N1/A) and (1 - N2/B) differ by more than their 1s
            d = sp.expand(u - v)
            if d == 0 or not self.sums(d):
                continue
            if len(sp.Add.make_args(d)) < len(sp.Add.make_args(sp.expand(u))) + len(sp.Add.make_args(sp.expand(v))):
                pairs.append((u, v, d))
        return pairs

    def rewrite(self, loss: sp.Expr) -> sp.Expr:
        if sp.count_ops(loss) > MAX_OPS:
            return loss
        pairs = self.close_pairs(loss)
        if pairs:
            loss = self._rewrite_node(loss, pairs)
        return self.fuse_sums(self.close_roots(loss))

    # step 4
    def close(self, u: sp.Symbol, v: sp.Symbol) -> bool:
        """Are the sums u and v close (:func:`close_summands`)?"""
        return close_summands(self.program.reductions[u].summand, self.program.reductions[v].summand)

    def close_roots(self, expr: sp.Expr) -> sp.Expr:
        """c sqrt(U) - c sqrt(V) + rest -> c root_difference(U, V, U - V fused) + rest, for sums
        U and V that are close (:meth:`close`)."""
        def root_of(term):
            c, factor = term.as_coeff_Mul()
            if isinstance(factor, sp.Pow) and factor.exp == sp.S.Half and factor.base in self.sums(factor):
                return c, factor.base
            return None

        def visit(node):  # through Piecewise branches and their conditions too
            if not isinstance(node, sp.Basic) or node.is_Atom or not node.args:
                return node
            node = node.func(*[visit(a) for a in node.args])
            if not isinstance(node, sp.Add):
                return node
            terms = list(node.args)
            for t, u in itertools.permutations(terms, 2):
                ru, rv = root_of(t), root_of(u)
                if ru and rv and ru[0] == -rv[0] and ru[0] > 0 and self.close(ru[1], rv[1]):
                    d = self.fuse(ru[1] - rv[1])
                    rest = [w for w in terms if w is not t and w is not u]
                    return sp.Add(ru[0] * root_difference(ru[1], rv[1], d), *rest)
            return node
        return visit(expr)

    def fuse_sums(self, expr: sp.Expr) -> sp.Expr:
        """Every remaining sum of reductions with numeric coefficients and summands of both
        signs, as one fused sum (a union sum(p) + sum(y) - sum(p y) -> sum(p (1 - y) + (1 - p) y
        + p y)): its derivative is then one element expression, 1 - y, not 1 and -y apart."""
        def visit(node):
            if not isinstance(node, sp.Expr) or node.is_Atom:
                return node
            node = node.func(*[visit(a) for a in node.args])
            return self._fused_linear(node) if isinstance(node, sp.Add) else node
        return visit(expr)

    def _rewrite_node(self, node, pairs):
        """The smallest sum holding both members of a pair, over one denominator."""
        if not isinstance(node, sp.Expr) or node.is_Atom:
            return node
        inner = [p for p in pairs if _contains(node, p[0]) and _contains(node, p[1])]
        if not inner:
            return node
        nested = [p for p in inner if any(_holds(a, p[0], p[1]) for a in node.args)]
        if nested:  # pairs held by a smaller sum inside: rewrite there (every argument)
            node = node.func(*[self._rewrite_node(a, nested) for a in node.args])
        inner = [p for p in inner if p not in nested and _contains(node, p[0]) and _contains(node, p[1])]
        if not inner or not isinstance(node, sp.Add):
            return node
        used, names, back, pending = set(), {}, {}, []
        for u, v, d in inner:
            if u in used or v in used:
                continue
            used |= {u, v}
            U, V, Dd = sp.Dummy("U"), sp.Dummy("V"), sp.Dummy("d")
            names[u], names[v] = U, V
            back.update({U: u, V: v})
            pending.append((U, V, Dd, d))
        # only the terms made of the pairs' members and row constants are put over one
        # denominator: 1 - N1/A of 1 - N1/A + (N1/A)(1 - N2/B), not the whole sum
        values = set(self.program.reductions)
        opaque_terms = [t.xreplace(names) for t in node.args]
        part = [t for t in opaque_terms if not (t.free_symbols & values)]
        rest = [t for t in opaque_terms if t.free_symbols & values]
        if not any(t.has(*back) for t in part):
            return node
        numerator, denominator = sp.fraction(sp.together(sp.Add(*part)))
        numerator = sp.expand(numerator.xreplace({U: V + Dd for U, V, Dd, _ in pending}))
        if any(numerator.has(U) for U, _, _, _ in pending):
            return node
        # the rest of the denominator, made of the pairs' V alone: (V1 + d1) (V2 + d2) - E
        complement = sp.expand(denominator.xreplace({U: V + Dd for U, V, Dd, _ in pending}) - numerator)
        for _, _, Dd, d in pending:
            numerator = numerator.xreplace({Dd: self.fuse(d)})
        numerator = sp.factor_terms(numerator.xreplace(back))
        denominator = denominator.xreplace(back)
        if complement.free_symbols & {s for U, _, Dd, _ in pending for s in (U, Dd)}:
            return numerator / denominator + sp.Add(*rest).xreplace(back)
        complement = sp.factor_terms(complement.xreplace(back))
        kind = share if len(pending) > 1 else gradient_share
        return kind(numerator, complement, denominator) + sp.Add(*rest).xreplace(back)


def close_summands(u: sp.Expr, v: sp.Expr) -> bool:
    """Does u - v cancel symbolically: is it non-zero and shorter, expanded, than u and v
    together? (a - p + eps and a - n + eps share the anchor; p and y do not.)"""
    u, v = sp.expand(u), sp.expand(v)
    d = sp.expand(u - v)
    return d != 0 and len(sp.Add.make_args(d)) < len(sp.Add.make_args(u)) + len(sp.Add.make_args(v))


def _contains(expr, node) -> bool:
    """Is ``node`` a subtree of ``expr``? (Add.has would also match a part of a sum.)"""
    return any(n == node for n in sp.preorder_traversal(expr))


def _holds(expr, u, v) -> bool:
    """Is there a sum in ``expr`` (other than u and v) holding both u and v?"""
    return any(isinstance(node, sp.Add) and node != u and node != v and _contains(node, u) and _contains(node, v)
               for node in sp.preorder_traversal(expr))


def fuse_row_cancellations(program, loss: sp.Expr, unit: frozenset) -> sp.Expr:
    """``loss`` (lowered by ``program``) with close row values subtracted exactly and their
    differences computed as fused sums; the loss itself when there is nothing to fuse."""
    return Fuser(program, unit).rewrite(loss)
