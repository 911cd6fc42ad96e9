"""The vocabulary shared by every stage: which functions a spec may call, and what they mean.

A spec expression is parsed against ``FUNCTIONS`` (spec name -> SymPy builder); the
verification stage evaluates the same SymPy classes with ``MPMATH_IMPLEMENTATIONS``; the
Numba emitter prints them through its own table. A function that SymPy lacks (sigmoid,
softplus, logcosh) is a ``sympy.Function`` subclass here, with its derivative, so that
derivatives stay in the same compact vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mpmath
import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p

from .reductions import ROW_FUNCTIONS


class sigmoid(sp.Function):
    """Logistic function 1 / (1 + exp(-x)); sigmoid'(x) = sigmoid(x) sigmoid(-x)."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * sigmoid(-x)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))


class softplus(sp.Function):
    """softplus(x) = log(1 + exp(x)); softplus'(x) = sigmoid(x)."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))


class logcosh(sp.Function):
    """logcosh(x) = log(cosh(x)), evaluated without overflow or cancellation; logcosh' = tanh."""

    def fdiff(self, argindex=1):
        return sp.tanh(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_nonnegative(self):
        return self.args[0].is_real

    def _eval_rewrite_as_cosh(self, x, **kwargs):
        return sp.log(sp.cosh(x))


class xlogy(sp.Function):
    """x*log(y), and 0 where x = 0 (also where log(y) is infinite), as scipy.special.xlogy."""

    def fdiff(self, argindex=1):
        x, y = self.args
        return sp.log(y) if argindex == 1 else x / y

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_rewrite_as_log(self, x, y, **kwargs):
        return x * sp.log(y)


class xlog1py(sp.Function):
    """x*log1p(y), and 0 where x = 0, as scipy.special.xlog1py."""

    def fdiff(self, argindex=1):
        x, y = self.args
        return log1p(y) if argindex == 1 else x / (1 + y)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_rewrite_as_log(self, x, y, **kwargs):
        return x * sp.log(1 + y)


class logaddexp(sp.Function):
    """log(exp(a) + exp(b)) = max(a, b) + log1p(exp(-|a - b|)), never overflowing."""

    def fdiff(self, argindex=1):
        a, b = self.args
        return sigmoid(a - b) if argindex == 1 else sigmoid(b - a)

    def _eval_is_real(self):
        return self.args[0].is_real and self.args[1].is_real


class fma(sp.Function):
    """a*b + c with one rounding (the product is computed exactly)."""

    def fdiff(self, argindex=1):
        a, b, _ = self.args
        return (b, a, sp.S.One)[argindex - 1]

    def _eval_is_real(self):
        return all(a.is_real for a in self.args)

    def _eval_rewrite_as_Add(self, a, b, c, **kwargs):
        return a * b + c


class group(sp.Function):
    """Its argument, evaluated on its own before the enclosing sum or product: the code
    printer parenthesises it, and SymPy does not merge it into the enclosing expression."""

    def fdiff(self, argindex=1):
        return sp.S.One

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_rewrite_as_Add(self, x, **kwargs):
        return x


class real_group(group):
    """A group whose value is real wherever it is defined (a quotient N/D of real terms, which
    SymPy cannot call real since D may be 0): Abs and sign of it stay real functions."""

    def _eval_is_real(self):
        return True


class finite_or(sp.Function):
    """finite_or(a, b): a where it is a finite float, else b; in exact arithmetic a = b (rule
    parameter_first: b is a with its products taken in another order, which does not overflow
    where a does)."""

    def _eval_is_real(self):
        return self.args[0].is_real


class exact_sum(sp.Function):
    """a + b + ..., with every rounding error carried along (error-free two-sums), so terms of
    very different magnitudes that cancel leave the right digits, in whatever order."""

    def fdiff(self, argindex=1):
        return sp.S.One

    def _eval_is_real(self):
        return all(a.is_real for a in self.args)

    def _eval_rewrite_as_Add(self, *terms, **kwargs):
        return sp.Add(*terms)


class terms_size(sp.Function):
    """sum_k |t_k| of a form's terms t_k. A Piecewise whose condition compares two forms' sizes
    chooses between two forms of one value, equal in exact arithmetic: the one whose terms are
    smaller, and with them its rounding errors (stabilise_rows._others_apart)."""

    def _eval_is_real(self):
        return True

    def _eval_is_nonnegative(self):
        return True


class softmax_tie(sp.Function):
    """softmax_tie(d, size, c, helper) = d = 1 - 2 p_c, p_c = exp(g_c - R) the softmax weight of
    class c under R = logsumexp(g), d a form of it whose terms have total size ``size``. Where they
    cancel below SOFTMAX_TIE_THRESHOLD of it (class c ties for the row's mass with the others
    together), the kernels take it again as (T - 1)/(T + 1), T = sum_{k != c} exp(g_k - g_c),
    each difference g_k - g_c exact and each exponential and the sum in double-word arithmetic
    (lossgen/emit_rows.py: the module's function that ``helper`` names, :func:`softmax_tie_helper`)."""

    def _eval_is_real(self):
        return self.args[0].is_real


def softmax_tie_helper(r) -> sp.Symbol:
    """The name of the helper that computes :class:`softmax_tie` for the logsumexp reduction ``r``
    (a symbol of its own: the kernels write R itself as its max plus the log of the rest)."""
    return sp.Symbol(f"_tie{r.symbol.name}")


# |d| < this times the size of its terms: softmax_tie's form has lost more than 10 bits. Beyond
# it its error is a few units of 2**-53 of the size (the rounded softmax weights it sums), at most
# 2**10 k 1.1e-16 of d for k units: 3.4e-13 at k = 3.
SOFTMAX_TIE_THRESHOLD = 2.0 ** -10


class binary_scale(sp.Function):
    """2**e where v = m 2**e, 1/2 <= |m| < 1 (math.frexp), and 1 at v = 0: a power of two within
    a factor 2 of |v|. Dividing by it is exact (barring underflow), so values measured in it keep
    every exact cancellation of the unscaled ones."""

    def _eval_is_real(self):
        return True

    def _eval_is_positive(self):
        return True


class in_scale(sp.Function):
    """in_scale(g, q): the element g of a norm's vector times q, the inverse of that norm's
    binary scale P (a power of two, 1 unless the row's sum of squares left the safe range;
    :func:`lossgen.stabilise_rows.scaled_norms`): g/P exactly, an element of the scaled row
    whose squares neither underflow nor overflow."""

    def _eval_is_real(self):
        return self.args[0].is_real


class two_scaled(sp.Function):
    """two_scaled(x, n) = x 2**n (n an integer, 0 where no norm of the row left the safe range):
    math.ldexp, exact and without an inf or 0 on the way where x 2**n is a normal float (x = 0
    stays 0 at any n)."""

    def _eval_is_real(self):
        return self.args[0].is_real


class exprel(sp.Function):
    """expm1(z)/z, and 1 at z = 0 (the relative error exponential): where z is tiny, even
    subnormal, it is 1 + z/2 to full precision, where expm1(a*u)/a keeps only the bits of a
    subnormal a*u; exprel'(z) = (exp(z) - exprel(z))/z, 1/2 at z = 0."""

    def fdiff(self, argindex=1):
        z = self.args[0]
        return sp.Piecewise((sp.S.Half, sp.Eq(z, 0)), ((sp.exp(z) - exprel(z)) / z, True))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _eval_rewrite_as_expm1(self, z, **kwargs):
        return sp.Piecewise((sp.S.One, sp.Eq(z, 0)), (expm1(z) / z, True))

    def _pythoncode(self, printer):
        """The kernel's helper ``_exprel`` (templates/numba_helpers.py.j2)."""
        getattr(printer, "helpers_used", set()).add("exprel")
        return f"_exprel({printer._print(self.args[0])})"


class log1prel(sp.Function):
    """log1p(u)/u, and 1 at u = 0: where u = q/m is tiny, even subnormal, m*log1p(u) keeps only
    the bits of u, while q*log1prel(u) = q*(1 - u/2 + ...) keeps them all;
    log1prel'(u) = (1/(1 + u) - log1prel(u))/u, -1/2 at u = 0."""

    def fdiff(self, argindex=1):
        u = self.args[0]
        return sp.Piecewise((-sp.S.Half, sp.Eq(u, 0)), ((1 / (1 + u) - log1prel(u)) / u, True))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_rewrite_as_log1p(self, u, **kwargs):
        return sp.Piecewise((sp.S.One, sp.Eq(u, 0)), (log1p(u) / u, True))

    def _pythoncode(self, printer):
        """The kernel's helper ``_log1prel`` (templates/numba_helpers.py.j2)."""
        getattr(printer, "helpers_used", set()).add("log1prel")
        return f"_log1prel({printer._print(self.args[0])})"


def _clip(x, low, high):
    """clip(x, low, high) = Min(Max(x, low), high), as numpy.clip."""
    return sp.Min(sp.Max(x, low), high)


def _relu(x):
    return sp.Max(x, 0)


@dataclass(frozen=True)
class SpecFunction:
    """One callable name of the spec language."""

    build: Callable[..., sp.Expr]
    arity: tuple[int, int | None]  # (fewest, most) arguments; None: no upper bound
    meaning: str


# The whole whitelist: a spec may call these and nothing else.
FUNCTIONS: dict[str, SpecFunction] = {
    "Abs": SpecFunction(sp.Abs, (1, 1), "absolute value |x|"),
    "sign": SpecFunction(sp.sign, (1, 1), "sign of x, with sign(0) = 0"),
    "Heaviside": SpecFunction(sp.Heaviside, (1, 2), "step function, Heaviside(0) = 1/2 unless given"),
    "Max": SpecFunction(sp.Max, (2, None), "largest argument"),
    "Min": SpecFunction(sp.Min, (2, None), "smallest argument"),
    "clip": SpecFunction(_clip, (3, 3), "clip(x, low, high) = Min(Max(x, low), high)"),
    "relu": SpecFunction(_relu, (1, 1), "Max(x, 0)"),
    "Piecewise": SpecFunction(sp.Piecewise, (1, None), "Piecewise((expr, cond), ..., (expr, True))"),
    "exp": SpecFunction(sp.exp, (1, 1), "exponential"),
    "log": SpecFunction(sp.log, (1, 1), "natural logarithm"),
    "log1p": SpecFunction(log1p, (1, 1), "log(1 + x), accurate for small x"),
    "expm1": SpecFunction(expm1, (1, 1), "exp(x) - 1, accurate for small x"),
    "sqrt": SpecFunction(sp.sqrt, (1, 1), "square root"),
    "hypot": SpecFunction(hypot, (2, 2), "sqrt(x**2 + y**2) without overflow"),
    "sin": SpecFunction(sp.sin, (1, 1), "sine"),
    "cos": SpecFunction(sp.cos, (1, 1), "cosine"),
    "tan": SpecFunction(sp.tan, (1, 1), "tangent"),
    "asin": SpecFunction(sp.asin, (1, 1), "inverse sine"),
    "acos": SpecFunction(sp.acos, (1, 1), "inverse cosine"),
    "atan": SpecFunction(sp.atan, (1, 1), "inverse tangent"),
    "sinh": SpecFunction(sp.sinh, (1, 1), "hyperbolic sine"),
    "cosh": SpecFunction(sp.cosh, (1, 1), "hyperbolic cosine"),
    "tanh": SpecFunction(sp.tanh, (1, 1), "hyperbolic tangent"),
    "asinh": SpecFunction(sp.asinh, (1, 1), "inverse hyperbolic sine"),
    "erf": SpecFunction(sp.erf, (1, 1), "error function"),
    "erfc": SpecFunction(sp.erfc, (1, 1), "complementary error function"),
    "sigmoid": SpecFunction(sigmoid, (1, 1), "logistic function 1/(1 + exp(-x))"),
    "softplus": SpecFunction(softplus, (1, 1), "log(1 + exp(x)) without overflow"),
    "logcosh": SpecFunction(logcosh, (1, 1), "log(cosh(x)) without overflow"),
    "logaddexp": SpecFunction(logaddexp, (2, 2), "log(exp(a) + exp(b)) without overflow"),
    "xlogy": SpecFunction(xlogy, (2, 2), "x*log(y), 0 where x = 0"),
}

# Row-wise losses add reductions over their axis (sum, mean, logsumexp, take, ...).
FUNCTIONS.update({name: SpecFunction(*entry) for name, entry in ROW_FUNCTIONS.items()})

CONSTANTS: dict[str, sp.Expr] = {"pi": sp.pi, "E": sp.E}


def _mp_exp(x):
    """mpmath.exp(x). Above 600 bits of precision mpmath takes exp of an integer as e**n by
    repeated squaring: 5 ms at n = 1e300, against 0.15 ms for exp(x + 1/2) exp(-1/2), which
    is exact to the working precision. The verification's stress points are such integers."""
    if isinstance(x, mpmath.mpf) and abs(x) > 2**64:
        half = mpmath.mpf(0.5)
        return mpmath.exp(x + half) * mpmath.exp(-half)
    return mpmath.exp(x)


# Reference implementations for high-precision evaluation (verification stage). Keys are the
# names SymPy's printers use for these classes.
MPMATH_IMPLEMENTATIONS: dict[str, Callable] = {
    "exp": _mp_exp,
    "sigmoid": lambda x: 1 / (1 + _mp_exp(-x)),
    "softplus": lambda x: mpmath.log1p(_mp_exp(x)),
    "logcosh": lambda x: mpmath.log((_mp_exp(x) + _mp_exp(-x)) / 2),
    "log1p": mpmath.log1p,
    "expm1": mpmath.expm1,
    "hypot": mpmath.hypot,
    "Heaviside": lambda x, h0=mpmath.mpf(0.5): (mpmath.mpf(1) if x > 0 else (mpmath.mpf(0) if x < 0 else h0)),
    "sign": mpmath.sign,
    "xlogy": lambda x, y: mpmath.mpf(0) if x == 0 else x * mpmath.log(y),
    "xlog1py": lambda x, y: mpmath.mpf(0) if x == 0 else x * mpmath.log1p(y),
    "logaddexp": lambda a, b: mpmath.log(_mp_exp(a) + _mp_exp(b)),
    "fma": lambda a, b, c: a * b + c,
    "exact_sum": lambda *terms: mpmath.fsum(terms),
    "group": lambda x: x,
    "finite_or": lambda a, b: a,
    "terms_size": lambda *terms: mpmath.fsum(abs(t) for t in terms),
    "exprel": lambda z: mpmath.mpf(1) if z == 0 else mpmath.expm1(z) / z,
    "log1prel": lambda u: mpmath.mpf(1) if u == 0 else mpmath.log1p(u) / u,
}
