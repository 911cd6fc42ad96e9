"""Stage 4, emit: render a derivation as a Numba kernel module through Jinja2 templates.

The printer turns SymPy into scalar Python that Numba compiles (a ``_print_Foo`` visitor,
as SymPy's own printers); common subexpressions are shared within each fused kernel by
``sympy.cse``. Output depends only on the expressions, so it is byte-for-byte reproducible.
"""
from __future__ import annotations

from contextlib import contextmanager

import math
import re

import jinja2
import sympy as sp
from sympy.printing.precedence import precedence
from sympy.codegen.cfunctions import expm1, log1p
from sympy.printing.pycode import PythonCodePrinter

from .derive import KERNELS, Derivation
from .domains import DOMAINS
from .paths import TEMPLATES_DIR
from .vocabulary import group, logcosh, sigmoid, softplus

MARKER = "lossgen-generated"  # first comment line of every generated file

# SymPy function class name -> helper defined in templates/numba_helpers.py.j2
HELPERS = {
    "sign": "sign",
    "Heaviside": "heaviside",
    "sigmoid_from": "sigmoid_from",
    "softplus_from": "softplus_from",
    "logcosh_from": "logcosh_from",
    "tanh_from": "tanh_from",
    "cosh_from": "cosh_from",
    "xlogy": "xlogy",
    "xlog1py": "xlog1py",
    "logaddexp": "logaddexp",
    "fma": "fma",
    "hypot": "hypot",
    "finite_or": "finite_or",
}

HELPERS_NEEDED = {"tanh_from": ("fma",), "hypot": ("fma",), "vexp": ("exp_core",),
                  "vexpm1": ("exp_core",),
                  "vlog1p": (), "vlogcosh_from": ("vlog1p",)}  # helper -> the helpers that it calls

# The exponentials of a kernel that LLVM can vectorise (VECTORISES): `math` function -> the helper
# in arithmetic alone (templates/numba_helpers.py.j2) that it calls there. This Numba has no SVML,
# so libm's exp and expm1 are a call per element and keep a loop scalar. In a loop that stayed
# scalar the helpers were slower than libm's (Poisson's grad_hess 1.9x the time, where LLVM did not
# inline them); vectorised, they take four elements to an instruction (AVX2). Elsewhere, libm's.
VECTOR_FUNCTIONS = {"exp": "vexp", "expm1": "vexpm1", "log1p": "vlog1p"}

# Helpers that call libm -> their version for a vectorising kernel, of the VECTOR_FUNCTIONS'
# helpers and selects (templates/numba_helpers.py.j2).
VECTOR_HELPERS = {"logcosh_from": "vlogcosh_from"}

# Functions (as printed, after code_form) that vectorise: arithmetic, the VECTOR_FUNCTIONS' helpers,
# and the helpers written in arithmetic around them. A kernel of these alone that takes an
# exponential calls the VECTOR_FUNCTIONS' helpers (kernel_vectorises).
VECTORISES = frozenset({
    "exp", "expm1", "exp_neg_abs", "expm1_abs", "sigmoid_from", "tanh_from", "div",
    "log1p", "softplus_from", "logcosh_from",
})

# Functions that cost a few machine instructions: a kernel made of these alone (and of integer
# powers) is "arithmetic", bound by memory; one whose loop vectorises with the VECTOR_FUNCTIONS'
# helpers is "vector"; any other function (exp, log, a root, a non-integer power, a helper that
# calls them) makes it "libm". The runtime picks the serial or the parallel loop by this cost
# (runtime.SERIAL_BELOW): threads pay off on far smaller arrays where each element calls libm.
ARITHMETIC_FUNCTIONS = frozenset({
    "Abs", "sign", "Heaviside", "Max", "Min", "Piecewise", "fma", "group", "real_group", "exact_sum", "finite_or",
    "terms_size",
})


class NumbaPrinter(PythonCodePrinter):
    """Scalar Python for Numba: ``math`` functions, exact float literals, stable helpers."""

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self.helpers_used: set[str] = set()
        self.named: dict = {}  # Piecewise -> the variable that holds its value (scoped_code)
        self.vector = False  # exp and expm1 as VECTOR_FUNCTIONS' helpers (kernel_vectorises)

    @contextmanager
    def vectorised(self, on: bool = True):
        """Within this context, print exp, expm1 and log1p as the VECTOR_FUNCTIONS' helpers
        (``on``: a loop that kernel_vectorises), then as libm's again."""
        self.vector = on
        try:
            yield self
        finally:
            self.vector = False

    def _call(self, function: str, argument: str) -> str:
        """function(argument): libm's, or its VECTOR_FUNCTIONS helper in a vectorising kernel."""
        if self.vector and function in VECTOR_FUNCTIONS:
            self.helpers_used.add(VECTOR_FUNCTIONS[function])
            self.helpers_used.update(HELPERS_NEEDED[VECTOR_FUNCTIONS[function]])
            return f"_{VECTOR_FUNCTIONS[function]}({argument})"
        return f"math.{function}({argument})"

    def _print_exp(self, expr):
        return self._call("exp", self._print(expr.args[0]))

    def _print_expm1(self, expr):
        return self._call("expm1", self._print(expr.args[0]))

    def _print_log1p(self, expr):
        return self._call("log1p", self._print(expr.args[0]))

    def _print_Piecewise(self, expr):
        # a name in place of the Piecewise, not xreplace: that would reorder the factors
        # and terms around it, and change the rounding
        if expr in self.named:
            return str(self.named[expr])
        return super()._print_Piecewise(expr)

    def _print_exp_neg_abs(self, expr):
        return self._call("exp", f"-abs({self._print(expr.args[0])})")

    def _print_expm1_abs(self, expr):
        return self._call("expm1", f"abs({self._print(expr.args[0])})")

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"  # kernels return floats, also where a branch is a constant

    def _print_Pow(self, expr, rational=False):
        # integer exponents stay integers: Numba turns x**2 into x*x, x**2.0 into pow();
        # x**(-2) is printed 1.0/x**2, since Numba raises ZeroDivisionError for 0.0**(-2)
        if expr.exp.is_Integer and expr.exp not in (-1, 0, 1):
            base = self.parenthesize(expr.base, precedence(expr), strict=True)
            return f"{base}**{int(expr.exp)}" if expr.exp > 0 else f"(1.0/{base}**{-int(expr.exp)})"
        return super()._print_Pow(expr, rational)

    def _print_exact_sum(self, expr):
        self.helpers_used.add("exact_sum")
        terms = [self._print(t) for t in expr.args]
        state = f"_sum_start({terms[0]})"
        for term in terms[1:]:
            state = f"_sum_add({state}, {term})"
        return f"_sum_finish({state})"

    def _print_terms_size(self, expr):
        return "(" + " + ".join(f"abs({self._print(t)})" for t in expr.args) + ")"

    def _print_div(self, expr):
        numerator, denominator = expr.args
        return f"(({self._print(numerator)})/({self._print(denominator)}))"  # an operand of ** too

    def _print_binary_scale(self, expr):
        return f"math.ldexp(1.0, math.frexp({self._print(expr.args[0])})[1])"

    def _print_group(self, expr):
        return f"({self._print(expr.args[0])})"

    _print_real_group = _print_group

    def _print_helper(self, expr):
        helper = HELPERS[type(expr).__name__]
        if self.vector:
            helper = VECTOR_HELPERS.get(helper, helper)
        self.helpers_used.add(helper)
        self.helpers_used.update(HELPERS_NEEDED.get(helper, ()))
        return f"_{helper}({', '.join(self._print(a) for a in expr.args)})"


for _name in HELPERS:
    setattr(NumbaPrinter, f"_print_{_name}", NumbaPrinter._print_helper)


def domain_guard(spec) -> sp.Expr | None:
    """The condition that every input lies in its domain (None when all are real): outside
    it a kernel returns nan, instead of whatever number the formula happens to give."""
    conditions = []
    for i in spec.inputs:
        d, x = DOMAINS[i.domain], sp.Symbol(i.name)  # no assumptions: y >= 0 must stay a test
        if d.values:
            conditions.append(sp.Or(*(sp.Eq(x, v) for v in d.values)))
            continue
        if d.low != -math.inf:
            conditions.append(x >= d.low if d.low_closed else x > d.low)
        if d.high != math.inf:
            conditions.append(x <= d.high if d.high_closed else x < d.high)
    return sp.And(*conditions, evaluate=False) if conditions else None


class exp_neg_abs(sp.Function):
    """exp(-|u|), printed as such: the one exponential of sigmoid(u), sigmoid(-u), softplus(u)
    and softplus(-u), which never overflows."""


class sigmoid_from(sp.Function):
    """sigmoid(u) from (u, exp(-|u|)): the helper _sigmoid_from."""


class softplus_from(sp.Function):
    """softplus(u) from (u, log1p(exp(-|u|))): the helper _softplus_from."""


class expm1_abs(sp.Function):
    """expm1(|u|), printed as such: the one function call of tanh(u), cosh(u) and logcosh(u)."""


class tanh_from(sp.Function):
    """tanh(u) from (u, expm1(|u|)): the helper _tanh_from."""


class logcosh_from(sp.Function):
    """logcosh(u) from (u, expm1(|u|)): the helper _logcosh_from."""


class cosh_from(sp.Function):
    """cosh(u) from (u, expm1(|u|)): the helper _cosh_from."""


# Functions written in code as helpers of shared parts, so that common-subexpression elimination
# computes each part once: sigmoid(x), sigmoid(-x), softplus(x) and softplus(-x) take one
# exp(-|x|), and the softpluses one log1p of it (each helper does what the whole function's
# helper did, in the same order, so the values are bit for bit the same); tanh(x), cosh(x) and
# logcosh(x) take one expm1(|x|), in place of libm's tanh, cosh and a sinh (each 1.5-2 times the
# time of expm1 in glibc; the values within a few units in the last place of the libm functions').
EXPANSIONS = {
    sigmoid: lambda u: sigmoid_from(u, exp_neg_abs(u)),
    softplus: lambda u: softplus_from(u, log1p(exp_neg_abs(u))),
    sp.tanh: lambda u: tanh_from(u, expm1_abs(u)),
    sp.cosh: lambda u: cosh_from(u, expm1_abs(u)),
    logcosh: lambda u: logcosh_from(u, expm1_abs(u)),
}


def _expanded(expr: sp.Expr) -> sp.Expr:
    """The EXPANSIONS' functions written in their shared parts."""
    return expr.replace(lambda e: type(e) in EXPANSIONS, lambda e: EXPANSIONS[type(e)](*e.args))


# Even functions whose helper starts from |u|, so that f(-u) = f(u) bit for bit: their
# arguments are printed with one sign, and common-subexpression elimination computes
# y*logcosh(-x/2) + (1 - y)*logcosh(x/2) with one logcosh. (SymPy does this itself for cosh.)
EVEN_FUNCTIONS = (logcosh, exp_neg_abs, expm1_abs)


def _even_arguments_unsigned(expr: sp.Expr) -> sp.Expr:
    """f(-u) -> f(u) for the EVEN_FUNCTIONS."""
    return expr.replace(lambda e: isinstance(e, EVEN_FUNCTIONS) and e.args[0].could_extract_minus_sign(),
                        lambda e: e.func(-e.args[0]))


class div(sp.Function):
    """a/b as one division: common-subexpression elimination must not turn y/q into y*(1/q),
    which is inf*0 = nan for a subnormal q and y = 0."""


def _as_divisions(expr: sp.Expr) -> sp.Expr:
    """Every quotient as div(numerator, denominator), outermost first."""
    if isinstance(expr, (sp.Mul, sp.Pow)):
        numerator, denominator = sp.fraction(expr, exact=True)
        if denominator != 1:
            return div(_as_divisions(numerator), _as_divisions(denominator))
    if not expr.args or isinstance(expr, sp.Symbol):
        return expr
    return expr.func(*[_as_divisions(a) for a in expr.args])


def code_form(expr: sp.Expr) -> sp.Expr:
    """``expr`` as the printer takes it: functions in their shared parts, even functions'
    arguments unsigned, quotients as div."""
    return _as_divisions(_even_arguments_unsigned(_expanded(_even_arguments_unsigned(expr))))


def _exp_from_expm1(exprs: list[sp.Expr]) -> list[sp.Expr]:
    """exp(a) as expm1(a) + 1 in the branch of a Piecewise (condition |a| <= c, c <= 1) that
    computes expm1(a) anyway, so that the elements taking it call one function, not two
    (Poisson's exp(p) - y as 1 - y + expm1(p) for |p| <= 1, beside the Hessian exp(p)). There
    expm1(a) + 1 is within 2 units in the last place of exp(a) (expm1's error shrinks by
    |expm1(a)|/e**a <= e - 1 in the sum); elsewhere exp(a) stays. An exp(a) outside the
    Piecewise becomes a Piecewise with the same conditions, computed in the same statement;
    where an exp(a) lies in a branch of another Piecewise, nothing changes."""
    targets = {}
    for piecewise in {p for e in exprs for p in e.atoms(sp.Piecewise)}:
        conditions = tuple(c for _, c in piecewise.args)
        for k, (value, c) in enumerate(piecewise.args):
            if isinstance(c, sp.LessThan) and isinstance(c.lhs, sp.Abs) and c.rhs.is_Number and c.rhs <= 1:
                a = c.lhs.args[0]
                if value.has(expm1(a)) and any(e.has(sp.exp(a)) for e in exprs) \
                        and all(_unconditional(e, sp.exp(a), conditions) for e in exprs):
                    targets.setdefault(a, (conditions, k))
    for a, (conditions, k) in sorted(targets.items(), key=lambda item: sp.default_sort_key(item[0])):
        far, near = sp.exp(a), group(expm1(a) + 1)
        anywhere = sp.Piecewise(*[(near if j == k else far, c) for j, c in enumerate(conditions)])

        def rewrite(e):
            if e == far:
                return anywhere
            if isinstance(e, sp.Piecewise):
                if tuple(c for _, c in e.args) == conditions:
                    return sp.Piecewise(*[(v.xreplace({far: near}) if j == k else v, c)
                                          for j, (v, c) in enumerate(e.args)])
                return sp.Piecewise(*[(rewrite(v), c) for v, c in e.args])
            if not e.args or not e.has(far):
                return e
            return e.func(*[rewrite(x) for x in e.args])

        exprs = [rewrite(e) for e in exprs]
    return exprs


def _unconditional(expr, target, conditions, nested=False) -> bool:
    """No ``target`` in ``expr`` lies in a branch of a Piecewise with other ``conditions``."""
    if expr == target:
        return not nested
    if isinstance(expr, sp.Piecewise):
        if tuple(c for _, c in expr.args) == conditions:
            return True
        nested = True
    return all(_unconditional(a, target, conditions, nested) for a in expr.args if isinstance(a, sp.Basic))


def kernel_cost(exprs: list[sp.Expr], vectorises: bool = False) -> str:
    """"arithmetic" where ``exprs`` use only ARITHMETIC_FUNCTIONS and integer powers; "vector"
    where their loop vectorises with the VECTOR_FUNCTIONS' helpers (``vectorises``, see
    kernel_vectorises: a few ns per element, so threads pay from tens of thousands of
    elements); else "libm" (a libm call per element: threads pay from a few thousand)."""
    if vectorises:
        return "vector"
    for expr in exprs:
        if any(type(f).__name__ not in ARITHMETIC_FUNCTIONS for f in expr.atoms(sp.Function)) \
                or any(not power.exp.is_Integer for power in expr.atoms(sp.Pow)):
            return "libm"
    return "arithmetic"


def kernel_vectorises(exprs: list[sp.Expr], also: frozenset = frozenset(), exponential: bool = True) -> bool:
    """Whether ``exprs`` (in code_form) take an exponential and otherwise only functions that
    vectorise (VECTORISES, ARITHMETIC_FUNCTIONS, ``also``) and integer powers: a loop of them
    vectorises with the VECTOR_FUNCTIONS' helpers in place of libm's exp and expm1 (any other
    libm call would keep it scalar, where libm's exp is the faster). Without ``exponential``,
    whether they would vectorise once an exponential is taken of them (a row's log-sum-exp)."""
    names = {type(f).__name__ for e in exprs for f in e.atoms(sp.Function) if not f.is_number}  # log(2): a constant
    return (bool(names & {"exp", "expm1", "exp_neg_abs", "expm1_abs"}) or not exponential) \
        and names <= VECTORISES | ARITHMETIC_FUNCTIONS | also \
        and all(power.exp.is_Integer for e in exprs for power in e.atoms(sp.Pow))


def kernel_code(exprs: list[sp.Expr], printer: NumbaPrinter, vector: bool = False) -> tuple[list[str], str]:
    """Assignment lines and the return expression computing ``exprs`` with shared CSEs; with
    ``vector`` (where kernel_vectorises), exp and expm1 as the VECTOR_FUNCTIONS' helpers and
    every temporary computed before everything (scoped_code)."""
    lines, printed = kernel_statements(exprs, printer, vector)
    return lines, ", ".join(printed)


def kernel_statements(exprs: list[sp.Expr], printer: NumbaPrinter, vector: bool = False) -> tuple[list[str], list[str]]:
    """kernel_code's lines and its printed ``exprs``, one string each."""
    with printer.vectorised(vector):
        return scoped_code(_unshared_cosh([code_form(e) for e in exprs]), printer, "_t", "_b")


def _unshared_cosh(exprs: list[sp.Expr]) -> list[sp.Expr]:
    """cosh_from(u, expm1(|u|)) back to cosh(u) where nothing else in the kernel takes that
    expm1: alone, libm's cosh is the cheaper call (log_cosh's Hessian kernel, 13.0 against 17.5 ns
    per element; its loss_grad_hess, which shares the expm1 with tanh and logcosh, 56 against 78)."""
    nodes = set().union(*(e.atoms(cosh_from) for e in exprs))
    if not nodes:
        return exprs
    elsewhere = set().union(*(e.xreplace({n: sp.S.Zero for n in nodes}).atoms(expm1_abs) for e in exprs))
    alone = {n: sp.cosh(n.args[0]) for n in nodes if n.args[1] not in elsewhere}
    return [e.xreplace(alone) for e in exprs] if alone else exprs


def scoped_code(exprs: list[sp.Expr], printer: NumbaPrinter, temporary: str,
                branch: str) -> tuple[list[str], list[str]]:
    """Statements (indented relative to the first, 4 spaces a level) and the printed ``exprs``,
    common subexpressions shared (``sympy.cse``; names ``temporary`` + n).

    A subexpression that only one branch of a Piecewise uses is computed inside that branch,
    not before the Piecewise: there, the Piecewise becomes an if/elif/else statement (one for
    all Piecewises with the same conditions; its values are named ``branch`` + n). Otherwise
    CSE would compute the transcendental functions of every branch for every element. Each
    value is the same expression as without the scoping, so the results are identical.

    Not where the printer's ``vector`` is set (kernel_vectorises): a vectorised loop computes
    every branch for every element anyway, so each temporary is computed once, before
    everything (inside branches, LLVM kept copies of a function in each and left poly1_binary's
    gradient scalar)."""
    exprs = _exp_from_expm1(exprs)
    replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(temporary), order="canonical")
    if printer.vector:
        printer.named = {}
        return ([f"{symbol} = {printer.doprint(value)}" for symbol, value in replacements],
                [printer.doprint(e) for e in reduced])
    scoped = _Scopes(replacements, reduced)

    def unscoped():  # every temporary before everything
        printer.named = {}
        return _compute_where_read([f"{symbol} = {printer.doprint(value)}" for symbol, value in replacements],
                                   [printer.doprint(e) for e in reduced],
                                   _branch_only(replacements, reduced, {symbol for symbol, _ in replacements}))

    if not scoped.groups_with_locals():
        return unscoped()
    try:
        top_level = {symbol for symbol, _ in replacements if scoped.scope[symbol] is None}
        lines, printed = scoped.code(printer, branch)
        return _compute_where_read(lines, printed, _branch_only(replacements, reduced, top_level))
    except _Cycle:  # the statements cannot be ordered (softmax cross-entropy's grad_hess): no scoping
        return unscoped()
    finally:
        printer.named = {}


def _branch_only(replacements, reduced, top_level) -> list:
    """The temporaries of ``top_level`` (computed before everything) that call a function (exp,
    log, ...) and are read only inside branches of Piecewises, in order of definition: CSE
    computes them for every element, where only a rare branch needs them (the exp of a branch
    for p < 1e-300). What one branch alone reads is already scoped into it (_Scopes); these are
    shared by branches of different Piecewises."""
    values = dict(replacements)
    eager: set = set()

    def walk(expr, in_branch):
        if expr in values:
            if not in_branch:
                eager.add(expr)
            return
        if isinstance(expr, sp.Piecewise):
            for value, condition in expr.args:
                walk(condition, in_branch)
                walk(value, True)
            return
        for argument in expr.args:
            if isinstance(argument, sp.Basic):
                walk(argument, in_branch)

    for expr in reduced:
        walk(expr, False)
    read = {s for _, value in replacements for s in value.free_symbols} | {s for e in reduced for s in e.free_symbols}
    lazy = []
    for symbol, value in reversed(replacements):
        if symbol in top_level and symbol not in eager and symbol in read and not value.has(sp.Piecewise) \
                and any(not isinstance(f, div) for f in value.atoms(sp.Function)):
            lazy.append(symbol)
        walk(value, symbol in lazy)  # what a lazy temporary reads, it reads in a branch
    return lazy[::-1]


def _compute_where_read(lines: list[str], printed: list[str], lazy: list) -> tuple[list[str], list[str]]:
    """Drop the statements ``name = value`` of the ``lazy`` temporaries and write ``(value)``
    where they are read, in the printed code itself: the other expressions print as before, so
    every value is computed as before, and a lazy one only in the branches that read it (twice
    where two taken branches read it)."""
    if not lazy:
        return lines, printed
    texts = {}
    for symbol in lazy:
        name = str(symbol)
        statement = next(line for line in lines if line.startswith(f"{name} = "))
        texts[name] = statement[len(name) + 3:]
        lines = [line for line in lines if line is not statement]
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in texts) + r")\b")
    for name in texts:  # a lazy temporary may read an earlier one
        texts[name] = pattern.sub(lambda m: f"({texts[m.group(1)]})", texts[name])
    inline = lambda text: pattern.sub(lambda m: f"({texts[m.group(1)]})", text)  # noqa: E731
    return [inline(line) for line in lines], [inline(text) for text in printed]


class _Cycle(Exception):
    pass


class _Scopes:
    """Where each CSE temporary is computed: before everything (scope None) or inside branch k
    of the if-statement of group g (scope (g, k)). A group gathers the Piecewises with the same
    conditions that are evaluated unconditionally (in an output, or in a temporary computed
    before everything), and a Piecewise nested elsewhere with those same conditions: its value
    is then computed in the group's statement too. Any other nested Piecewise stays an inline
    conditional expression, and what only it uses is computed in the enclosing branch."""

    def __init__(self, replacements, reduced):
        self.replacements, self.reduced = replacements, reduced
        self.values = dict(replacements)
        self.root_conditions: set = set()
        self._place()
        if self.groups:  # again, nested Piecewises with the conditions of a group joining it
            self.root_conditions = set(self.groups)
            self._place()

    def _place(self):
        self.uses = {symbol: [] for symbol, _ in self.replacements}
        self.groups: dict[tuple, int] = {}       # conditions -> group number
        self.members: dict[int, list] = {}       # group -> its Piecewises, in order of appearance
        for expr in self.reduced:
            self._walk(expr, None)
        self.scope = {}
        for symbol, value in reversed(self.replacements):
            uses = self.uses[symbol]
            self.scope[symbol] = uses[0] if uses and all(u == uses[0] for u in uses) else None
            self._walk(value, self.scope[symbol])

    def _walk(self, expr, scope):
        if expr in self.values:
            self.uses[expr].append(scope)
            return
        if isinstance(expr, sp.Piecewise):
            conditions = tuple(c for _, c in expr.args)
            joins = conditions in self.root_conditions and scope[0] != self.groups.get(conditions) \
                if scope is not None else True
            if joins:
                group = self.groups.setdefault(conditions, len(self.groups))
                members = self.members.setdefault(group, [])
                if expr in members:
                    return
                members.append(expr)
                for condition in conditions:
                    self._walk(condition, None)
                for k, (value, _) in enumerate(expr.args):
                    self._walk(value, (group, k))
                return
        for argument in expr.args:
            if isinstance(argument, sp.Basic):
                self._walk(argument, scope)

    def groups_with_locals(self) -> set:
        return {scope[0] for scope in self.scope.values() if scope is not None}

    def code(self, printer, branch_prefix) -> tuple[list[str], list[str]]:
        lifted_groups = sorted(self.groups_with_locals())
        # a temporary whose value is a lifted Piecewise is that Piecewise's name (assigned in
        # the statement), so that what reads it is ordered with the statement's own values
        lifted = {p for g in lifted_groups for p in self.members[g]}
        aliases = {value: symbol for symbol, value in self.replacements if value in lifted}
        names, count = {}, 0
        for group in lifted_groups:
            for piecewise in self.members[group]:
                if piecewise in aliases:
                    names[piecewise] = aliases[piecewise]
                else:
                    names[piecewise] = sp.Symbol(f"{branch_prefix}{count}")
                    count += 1
        lift = lambda e: e.xreplace(names)  # noqa: E731  (to find dependencies only)
        group_of = {names[p]: g for g in lifted_groups for p in self.members[g]}
        alias_symbols = set(aliases.values())
        locals_ = {}
        for symbol, _ in self.replacements:
            if self.scope[symbol] is not None and symbol not in alias_symbols:
                locals_.setdefault(self.scope[symbol], []).append(symbol)

        def needs(exprs) -> set:  # the items (root temporaries, groups) that exprs read
            found = set()
            for e in exprs:
                for s in lift(e).free_symbols:
                    if s in group_of:
                        found.add(("group", group_of[s]))
                    elif s in self.scope and self.scope[s] is None:
                        found.add(("temp", s))
            return found

        items = [("temp", s) for s, _ in self.replacements if self.scope[s] is None and s not in alias_symbols]
        items += [("group", g) for g in lifted_groups]
        requires = {}
        for kind, key in items:
            if kind == "temp":
                requires[kind, key] = needs([self.values[key]])
            else:
                branches = len(self.members[key][0].args)
                exprs = [c for _, c in self.members[key][0].args]
                exprs += [v for p in self.members[key] for v, _ in p.args]
                exprs += [self.values[s] for k in range(branches) for s in locals_.get((key, k), [])]
                requires[kind, key] = needs(exprs) - {(kind, key)}
        lines, done, pending = [], set(), list(items)
        printer.named = names
        while pending:
            ready = next((item for item in pending if requires[item] <= done), None)
            if ready is None:
                raise _Cycle()
            pending.remove(ready)
            done.add(ready)
            kind, key = ready
            if kind == "temp":
                lines.append(f"{key} = {printer.doprint(self.values[key])}")
                continue
            members = self.members[key]
            conditions = [c for _, c in members[0].args]
            for k, condition in enumerate(conditions):
                if condition == sp.true:
                    lines.append("else:")
                else:
                    lines.append(f"{'if' if k == 0 else 'elif'} {printer.doprint(condition)}:")
                for symbol, value in self._branch(key, k, locals_, names, lift):
                    lines.append(f"    {symbol} = {printer.doprint(value)}")
                if condition == sp.true:
                    break
            else:
                lines.append("else:")
                for piecewise in members:
                    lines.append(f"    {names[piecewise]} = math.nan")
        return lines, [printer.doprint(e) for e in self.reduced]

    def _branch(self, group, k, locals_, names, lift) -> list[tuple]:
        """(name, value) of branch k of a group's statement: its temporaries and its Piecewises'
        values, each after what it reads (a temporary may read a Piecewise of the group that
        joined it from elsewhere)."""
        items = [(s, self.values[s]) for s in locals_.get((group, k), [])]
        items += [(names[p], p.args[k][0]) for p in self.members[group]]
        here = {name for name, _ in items}
        requires = {name: (lift(value).free_symbols & here) - {name} for name, value in items}
        ordered, done, pending = [], set(), list(items)
        while pending:
            ready = next((item for item in pending if requires[item[0]] <= done), None)
            if ready is None:
                raise _Cycle()
            pending.remove(ready)
            done.add(ready[0])
            ordered.append(ready)
        return ordered


def _docstring(text) -> str:
    return str(text).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


# The two launchers of every array kernel (see runtime.kernel_launchers): (name suffix, extra
# numba.njit options, loop range, where it runs, for the docstring).
LAUNCHERS = (
    ("", "", "range", "in the calling thread"),
    ("_parallel", "parallel=True, ", "numba.prange", "on Numba's threads (numba.get_num_threads())"),
)


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False,
    )
    env.filters["py"] = repr
    env.filters["docstring"] = _docstring
    env.globals["launchers"] = LAUNCHERS
    return env


def render_module(original: Derivation, stable: Derivation, spec_path: str) -> str:
    """The source of one generated module.

    ``original`` gives the formulas of the docstring; ``stable`` (same loss, rewritten by
    the stabilisation stage) gives the code.
    """
    spec = stable.spec
    printer = NumbaPrinter()
    guard = domain_guard(spec)
    n_pred = len(spec.predictions)
    scalar_kernels = []
    for kernel, quantities in KERNELS.items():
        vector = kernel_vectorises([code_form(e) for e in stable.outputs(kernel)])
        lines, returns = kernel_statements(stable.outputs(kernel), printer, vector)
        count = sum(1 if q == "loss" else n_pred for q in quantities)
        vector_guard = guard is not None and vector
        if vector_guard:
            # nan outside the domain by a select, not an early return: LLVM's cost model counts
            # that branch against vectorising the loop (Poisson's grad stayed scalar with it)
            printer.helpers_used.add("select")
            returns = [f"_select(_inside, {r}, math.nan)" for r in returns]
        scalar_kernels.append({
            "name": kernel, "lines": lines, "returns": ", ".join(returns), "count": count,
            "vector": vector, "vector_guard": vector_guard,
            "cost": kernel_cost(stable.outputs(kernel), vector),
            "outside": ", ".join(["math.nan"] * count),
            "outs": [f"_out{j}" for j in range(count)], "vals": [f"_v{j}" for j in range(count)],
            "doc": f"{kernel.replace('_', ', ')} of one element"
                   + (f" (per prediction: {', '.join(p.name for p in spec.predictions)})"
                      if n_pred > 1 and kernel != "loss" else "") + ".",
        })
    formulas = {
        "loss": sp.sstr(original.loss),
        "predictions": [{"name": p.name, "grad": sp.sstr(g), "hess": sp.sstr(h)}
                        for p, g, h in zip(spec.predictions, original.grad, original.hess)],
    }
    inputs = [i.name for i in spec.inputs]
    params = [p.name for p in spec.params]
    return template_environment().get_template("loss_module.py.j2").render(
        spec=spec,
        spec_path=spec_path,
        marker=MARKER,
        formulas=formulas,
        helpers=printer.helpers_used,
        guard=None if guard is None else printer.doprint(guard),
        scalar_kernels=scalar_kernels,
        loss_vectorises=any(k["vector"] for k in scalar_kernels if k["name"] == "loss"),
        kernel_outputs={k["name"]: k["count"] for k in scalar_kernels},
        kernel_costs={**{k["name"]: k["cost"] for k in scalar_kernels},
                      "loss_sum": next(k["cost"] for k in scalar_kernels if k["name"] == "loss")},
        arguments=inputs + params,
        indexed_arguments=[f"{name}[_i]" for name in inputs] + params,
    )


def render_package_init(entries: list[tuple[str, str, str]]) -> str:
    """``__init__.py`` of a generated folder: the catalog (name, family, title) without imports."""
    return template_environment().get_template("package_init.py.j2").render(entries=entries, marker=MARKER)


