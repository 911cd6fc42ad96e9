"""Stage 4, emit (LaTeX): render a derivation as a section of the formula reference.

The sibling of :mod:`lossgen.emit`: where that one prints the derivation's expressions as
Numba code, this one prints the *same expression objects* as LaTeX, so the formulas people
read are the formulas the kernels compute. Nothing here parses a spec; it takes
:class:`~lossgen.derive.Derivation` objects (and, for the plots, the generated kernels).

* :class:`LossLatexPrinter`, a SymPy LaTeX printer for the spec vocabulary (sigmoid,
  softplus, log1p, Heaviside, ...) and the spec's own names;
* :func:`typeset`, the layout of one formula: the spec's ``let`` names substituted back
  where that is exact, shared subexpressions named (u_1, u_2, ...) by ``sympy.cse`` when a
  formula is too long for a line, long sums broken over lines; every step is an exact
  rewrite, and :meth:`Formula.reassemble` gives the typeset expression back;
* :func:`plot_data`, loss, gradient and Hessian sampled from the generated kernels;
* :func:`render_section` and :func:`render_reference`, the Jinja2 templates
  ``templates/loss_section.tex.j2`` (one ``\\input``-able fragment per loss) and
  ``templates/reference.tex.j2`` (the whole document).

User-written text (titles, summaries, references, docs, notes, special cases) goes through
:func:`latex_escape`; formulas come from SymPy. Output depends only on the specs and the
kernels' values, so it is byte-for-byte reproducible.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass, field

import jinja2
import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from .derive import Derivation, kink_expressions
from .domains import DOMAINS
from .paths import TEMPLATES_DIR

MARKER = "lossgen-generated"  # first comment line of every generated .tex file: "% lossgen-generated ..."

# --- escaping of user-written text -----------------------------------------------------------

_ESCAPES = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "%": r"\%", "_": r"\_", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", '"': r"\textquotedbl{}",
}
# Characters outside Latin-1 that pdflatex (utf8 input, T1 fonts) cannot print by itself.
_UNICODE = {
    "\u2013": "--", "\u2014": "---", "\u2018": "`", "\u2019": "'", "\u201c": "``", "\u201d": "''",
    "\u2026": r"\dots{}", "\u2212": r"\ensuremath{-}", "\u00b1": r"\ensuremath{\pm}",
    "\u00d7": r"\ensuremath{\times}", "\u00b7": r"\ensuremath{\cdot}", "\u2264": r"\ensuremath{\leq}",
    "\u2265": r"\ensuremath{\geq}", "\u2260": r"\ensuremath{\neq}", "\u2248": r"\ensuremath{\approx}",
    "\u221e": r"\ensuremath{\infty}", "\u2192": r"\ensuremath{\to}", "\u00a0": "~",
}
_GREEK_CAPITALS = {"Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega"}


def _greek(char: str) -> str | None:
    """``\\alpha`` for 'α' (and the capitals LaTeX has), else None."""
    name = unicodedata.name(char, "")
    match = re.fullmatch(r"GREEK (SMALL|CAPITAL) LETTER ([A-Z]+)", name)
    if not match:
        return None
    letter = match.group(2).capitalize() if match.group(1) == "CAPITAL" else match.group(2).lower()
    if match.group(1) == "CAPITAL" and letter not in _GREEK_CAPITALS:
        return None
    return "\\" + letter


def latex_escape(text: str, breaks: bool = False) -> str:
    """User text as LaTeX that prints exactly those characters.

    ``% _ & # $ \\ { } ^ ~ < > | "`` become their LaTeX commands; Latin-1 letters pass
    through (the document uses utf8 input and T1 fonts); common typographic and math
    characters and Greek letters are mapped; any other character prints as ``[U+XXXX]``.
    With ``breaks``, a line may break after ``.``, ``_``, ``/`` or ``=`` inside a long word
    such as ``torch.nn.functional.smooth_l1_loss``, so that it cannot overflow the margin.
    """
    out = []
    for index, char in enumerate(text):
        if char in _ESCAPES:
            piece = _ESCAPES[char]
        elif char in _UNICODE:
            piece = _UNICODE[char]
        elif ord(char) < 128:
            piece = char if char.isprintable() else " "
        elif ord(char) < 256 and char.isprintable():
            piece = char
        elif _greek(char):
            piece = r"\ensuremath{%s}" % _greek(char)
        else:
            piece = f"[U+{ord(char):04X}]"
        out.append(piece)
        following = text[index + 1:index + 2]
        if breaks and char in "._/=" and following and not following.isspace() and index > 0 \
                and not text[index - 1].isspace():
            out.append(r"\allowbreak{}")
    return "".join(out)


# --- the printer ------------------------------------------------------------------------------

def _math_name(name: str) -> str:
    """A part of a symbol's name as math: ASCII as is, Greek letters as commands."""
    if name.startswith("\\"):
        return name
    return "".join(c if ord(c) < 128 else (_greek(c) or r"\text{?}") for c in name)


class LossLatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer with the spec vocabulary and a reader's ordering.

    ``sigmoid(x)`` is sigma(x), ``softplus`` an operator, ``logcosh(x)`` is log cosh x,
    ``log1p(x)`` is log(1 + x), ``expm1(x)`` is (e^x - 1), ``hypot(x, y)`` is
    sqrt(x^2 + y^2), ``Heaviside`` is H; a name of several letters is one ``\\mathit`` word
    (not a product of letters), set off by thin spaces in a product; f(x) has no space
    before its parentheses; a sum starts with a positive term where it has one; a
    comparison puts the side with the variables on the left.
    """

    _default_settings = {**LatexPrinter._default_settings, "variables": frozenset()}

    def __init__(self, settings=None):
        super().__init__(settings or {})

    # names
    def _print_Symbol(self, expr, style="plain"):
        if expr in self._settings["symbol_names"]:
            return self._settings["symbol_names"][expr]
        base, supers, subs = self._split_super_sub(expr.name)

        def simple(part):  # a letter, a Greek letter or a number reads well as a sub/superscript
            return len(part) == 1 or part.isdigit() or part.startswith("\\")

        if not (simple(base) and all(simple(s) for s in supers + subs)):
            return r"\mathit{%s}" % _math_name(expr.name).replace("_", r"\_")
        name = _math_name(base)
        if style == "bold":
            name = r"\mathbf{%s}" % name
        if supers:
            name += "^{%s}" % " ".join(_math_name(s) for s in supers)
        if subs:
            name += "_{%s}" % " ".join(_math_name(s) for s in subs)
        return name

    def _print_Mul(self, expr):
        """A thin space around a name of several letters: beta margin, not betamargin."""
        tex = super()._print_Mul(expr)
        tex = re.sub(r"(?<=[\w})])\s+(?=\\mathit\{)", r" \\, ", tex)
        return re.sub(r"(\\mathit\{[^{}]*\})\s+(?=[\w\\(])(?!\\right|\\,)", r"\1 \\, ", tex)

    def _print_Relational(self, expr):
        """The side with the variables (inputs and names) on the left: |r| < delta."""
        lhs, rhs, op = expr.lhs, expr.rhs, expr.rel_op
        flipped = {">": "<", "<": ">", ">=": "<=", "<=": ">=", "==": "==", "!=": "!="}
        variables = self._settings.get("variables") or set()
        if (rhs.free_symbols & variables) and not (lhs.free_symbols & variables):
            lhs, rhs, op = rhs, lhs, flipped[op]
        symbol = {"==": "=", ">": ">", "<": "<", ">=": r"\geq", "<=": r"\leq", "!=": r"\neq"}[op]
        return "%s %s %s" % (self._print(lhs), symbol, self._print(rhs))

    # ordering
    def _print_Add(self, expr, order=None):
        terms = self._as_ordered_terms(expr, order=order)
        if terms[0].could_extract_minus_sign():
            positive = [t for t in terms if not t.could_extract_minus_sign()]
            if positive:
                terms = [positive[0]] + [t for t in terms if t is not positive[0]]
        tex = ""
        for i, term in enumerate(terms):
            if i > 0:
                if term.could_extract_minus_sign():
                    tex += " - "
                    term = -term
                else:
                    tex += " + "
            term_tex = self._print(term)
            if self._needs_add_brackets(term):
                term_tex = r"\left(%s\right)" % term_tex
            tex += term_tex
        return tex

    def _print_Piecewise(self, expr):
        rows = [r"%s & \text{if } %s" % (self._print(e), self._print(c)) for e, c in expr.args[:-1]]
        last = expr.args[-1]
        rows.append(r"%s & \text{otherwise}" % self._print(last.expr) if last.cond == sp.true
                    else r"%s & \text{if } %s" % (self._print(last.expr), self._print(last.cond)))
        return r"\begin{dcases} %s \end{dcases}" % r" \\ ".join(rows)

    # function calls: f(x), with parentheses that grow only around tall arguments
    @staticmethod
    def _paren(tex: str) -> str:
        tall = any(command in tex for command in (r"\frac", r"\begin", r"\sqrt", r"\sum", r"\left"))
        return r"\left(%s\right)" % tex if tall else "(%s)" % tex

    def _call(self, tex: str, args) -> str:
        """SymPy writes f{\\left(x \\right)} (a space after f); write f(x)."""
        printed = ",".join(str(self._print(a)) for a in args)
        old = r"{\left(%s \right)}" % printed
        at = tex.rfind(old)
        return tex if at < 0 else tex[:at] + self._paren(printed.replace(",", ", ")) + tex[at + len(old):]

    def _print_Function(self, expr, exp=None):
        return self._call(super()._print_Function(expr, exp), expr.args)

    def _print_log(self, expr, exp=None):
        return self._call(super()._print_log(expr, exp), expr.args)

    # the spec vocabulary
    def _function(self, name_tex, args, exp=None):
        inner = self._paren(", ".join(self._print(a) for a in args))
        return "%s%s" % (name_tex, inner) if exp is None else "%s^{%s}%s" % (name_tex, exp, inner)

    def _print_sigmoid(self, expr, exp=None):
        return self._function(r"\sigma", expr.args, exp)

    def _print_softplus(self, expr, exp=None):
        return self._function(r"\operatorname{softplus}", expr.args, exp)

    def _print_logcosh(self, expr, exp=None):
        return self._function(r"\log\cosh", expr.args, exp)

    def _print_log1p(self, expr, exp=None):
        inner = self._paren(self._print(sp.Add(sp.S.One, expr.args[0], evaluate=False)))
        return (r"\log%s" % inner) if exp is None else (r"\log^{%s}%s" % (exp, inner))

    def _print_expm1(self, expr, exp=None):
        tex = r"\left(e^{%s} - 1\right)" % self._print(expr.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)

    def _print_hypot(self, expr, exp=None):
        squares = " + ".join(self.parenthesize(a, PRECEDENCE["Pow"], strict=True) + "^{2}" for a in expr.args)
        tex = r"\sqrt{%s}" % squares
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)

    def _print_Heaviside(self, expr, exp=None):
        """H(x), with H(0) = 1/2; a Heaviside given another value at 0 shows it: H_{0}(x)."""
        name = "H" if len(expr.args) == 1 or expr.args[1] == sp.S.Half else "H_{%s}" % self._print(expr.args[1])
        return self._function(name, expr.args[:1], exp)

    def _print_xlogy(self, expr, exp=None):
        x, y = expr.args
        tex = r"%s \log%s" % (self.parenthesize(x, PRECEDENCE["Mul"]), self._function("", [y]))
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)

    def _print_xlog1py(self, expr, exp=None):
        x, y = expr.args
        inner = self._paren(self._print(sp.Add(sp.S.One, y, evaluate=False)))
        tex = r"%s \log%s" % (self.parenthesize(x, PRECEDENCE["Mul"]), inner)
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)

    def _print_logaddexp(self, expr, exp=None):
        inner = r"\left(%s\right)" % " + ".join(r"e^{%s}" % self._print(a) for a in expr.args)
        return (r"\log%s" % inner) if exp is None else (r"\log^{%s}%s" % (exp, inner))

    def _print_fma(self, expr, exp=None):
        a, b, c = expr.args
        tex = r"\left(%s %s + %s\right)" % (self.parenthesize(a, PRECEDENCE["Mul"]),
                                            self.parenthesize(b, PRECEDENCE["Mul"]), self._print(c))
        return tex if exp is None else r"%s^{%s}" % (tex, exp)


_PRINTER = LossLatexPrinter()


def latex(expr, variables=frozenset()) -> str:
    """``expr`` as LaTeX math, through :class:`LossLatexPrinter`; ``variables`` (symbols)
    go to the left of comparisons."""
    printer = LossLatexPrinter({"variables": frozenset(variables)}) if variables else _PRINTER
    return printer.doprint(expr)


# --- how wide a formula is -------------------------------------------------------------------
# A measured heuristic: units of about one math-italic letter at 10 pt (5.5 pt). A4 with the
# reference's 2 cm margins gives about 87 units a line; LINE_UNITS leaves room for the
# equation's left-hand side and alignment. pdflatex reports any overflow (`lossgen docs --pdf`
# fails on it), which is how the heuristic was calibrated, on the catalog and on long
# Hessians such as the focal loss's.

LINE_UNITS = 52.0
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[{}^_&]|\s+|.", re.S)
_SPACES = {",": 0.3, ":": 0.4, ";": 0.5, "!": -0.3, " ": 0.5, "quad": 1.8, "qquad": 3.6}
_WIDE = {"+": 2.2, "-": 2.2, "=": 2.4, "<": 2.4, ">": 2.4, ",": 0.8, "(": 0.7, ")": 0.7, "|": 0.5,
         "[": 0.6, "]": 0.6, ".": 0.5, "'": 0.5, "/": 1.0}
_RELATIONS = {"leq", "geq", "neq", "cdot", "times", "pm", "approx", "to", "in"}
_TEXT_COMMANDS = {"text", "mathit", "mathrm", "operatorname", "mathbf", "textrm"}
_NAMED_FUNCTIONS = {"log", "exp", "max", "min", "sin", "cos", "tan", "sinh", "cosh", "tanh", "sign",
                    "arcsin", "arccos", "arctan", "operatorname"}


def _parse(tokens, i=0, stop=None):
    """Tokens -> nested lists (groups); returns (items, next index)."""
    items = []
    while i < len(tokens):
        t = tokens[i]
        if t == "{":
            group, i = _parse(tokens, i + 1, "}")
            items.append(group)
            continue
        if t == stop:
            return items, i + 1
        items.append(t)
        i += 1
    return items, i


def _split_top(items, separator):
    """Split a token list at ``separator`` outside nested environments."""
    parts, current, depth = [], [], 0
    for t in items:
        if t == "\\begin":
            depth += 1
        elif t == "\\end":
            depth -= 1
        if t == separator and depth == 0:
            parts.append(current)
            current = []
        else:
            current.append(t)
    parts.append(current)
    return parts


def _width(items) -> float:
    """Width of a parsed token list (see :func:`tex_width`)."""
    total, i, n = 0.0, 0, len(items)

    def arg(j):
        """The width and end index of the argument at j (a group or one token)."""
        while j < n and isinstance(items[j], str) and items[j].isspace():
            j += 1
        if j >= n:
            return 0.0, j
        return _width([items[j]] if isinstance(items[j], str) else items[j]), j + 1

    while i < n:
        t = items[i]
        if isinstance(t, list):
            total += _width(t)
            i += 1
        elif t.isspace():
            i += 1
        elif t in ("^", "_"):
            w, i = arg(i + 1)
            total += 0.7 * w
        elif t == "\\begin":  # an environment (cases): its widest row
            depth, k = 1, i + 2
            while k < n and depth:
                depth += {"\\begin": 1, "\\end": -1}.get(items[k], 0) if isinstance(items[k], str) else 0
                k += 1
            body = items[i + 2:k - 1]
            rows = _split_top(body, "\\\\")
            total += 1.0 + max(sum(_width(cell) for cell in _split_top(row, "&"))
                               + 1.8 * (len(_split_top(row, "&")) - 1) for row in rows)
            i = k + 1  # past \end and its {name}
        elif t.startswith("\\") and len(t) > 1:
            name = t[1:]
            i += 1
            if name in ("frac", "dfrac", "tfrac"):
                a, i = arg(i)
                b, i = arg(i)
                total += max(a, b) + 0.4
            elif name == "sqrt":
                if i < n and items[i] == "[":
                    while i < n and items[i] != "]":
                        i += 1
                    i += 1
                w, i = arg(i)
                total += w + 1.2
            elif name in ("left", "right", "bigl", "bigr", "Bigl", "Bigr", "biggl", "biggr"):
                w, i = arg(i)
                total += 0.7 if w else 0.0
            elif name in _TEXT_COMMANDS:
                w, i = arg(i)
                total += (1.0 if name == "mathit" else 0.9) * w
            elif name in _SPACES:
                total += _SPACES[name]
            elif name in _RELATIONS:
                total += 2.4
            elif name in _NAMED_FUNCTIONS:
                total += 0.9 * len(name)
            else:  # a Greek letter, \ell, \partial, an escaped character
                total += 1.0
        elif t == "&":
            total += 1.8
            i += 1
        else:
            total += _WIDE.get(t, 1.0)
            i += 1
    return total


def tex_width(tex: str) -> float:
    """Estimated width of display math ``tex``, in units of about one letter."""
    items, _ = _parse(_TOKEN.findall(tex))
    return _width(items)


# --- the layout of one formula -----------------------------------------------------------------

def _is_condition(expr) -> bool:
    from sympy.logic.boolalg import Boolean
    return isinstance(expr, Boolean) or isinstance(expr, sp.core.relational.Relational)


def _same(a, b) -> bool:
    """a and b are the same expression: structurally, or their difference expands to 0 (an
    exact identity such as (y - p)(p - y) + (p - y)**2 = 0, which SymPy applies by itself when
    p - y becomes a symbol), compared branch by branch in a Piecewise and argument by argument
    in nodes of the same kind (expand does not see through Piecewise)."""
    if a == b:
        return True
    if not isinstance(a, sp.Basic) or not isinstance(b, sp.Basic):
        return False
    if isinstance(a, sp.Piecewise) and isinstance(b, sp.Piecewise):
        return len(a.args) == len(b.args) and all(
            ca == cb and _same(ea, eb) for (ea, ca), (eb, cb) in zip(a.args, b.args))
    if a.func == b.func and len(a.args) == len(b.args) and a.args and not a.is_Atom \
            and all(_same(x, y) for x, y in zip(a.args, b.args)):
        return True
    if a.has(sp.Piecewise) or b.has(sp.Piecewise) or _is_condition(a) or _is_condition(b) \
            or sp.count_ops(a) + sp.count_ops(b) > 400:
        return False
    try:
        return sp.expand(a - b) == 0
    except Exception:  # noqa: BLE001 - SymPy refusing is "not shown to be the same"
        return False


def _expand(expr, names: dict):
    """``expr`` with every name of ``names`` (whose values may use other names) replaced."""
    for _ in range(len(names) + 1):
        if not expr.has(*names):
            break
        expr = expr.xreplace(names)
    return expr


@dataclass(frozen=True)
class Definition:
    """A name for a subexpression: ``symbol = value`` (value may use other names)."""

    symbol: sp.Symbol
    value: sp.Expr
    lines: tuple[str, ...]
    tex: str  # the symbol, printed


@dataclass(frozen=True)
class Formula:
    """One typeset equation ``lhs = rhs``: the derivation's expression, as shown.

    ``expr`` is the expression object it was made from; ``shown`` is the same expression in
    terms of the spec's let names and of the ``where`` definitions; ``lines`` are the LaTeX
    lines of ``shown`` (one unless it was too long).
    """

    lhs: str
    expr: sp.Expr
    shown: sp.Expr
    lines: tuple[str, ...]
    where: tuple[Definition, ...]
    lets: tuple[tuple[sp.Symbol, sp.Expr], ...] = field(repr=False)
    names: tuple[tuple[sp.Symbol, sp.Expr], ...] = field(repr=False)  # every abbreviation of the section
    reused: str = ""  # names defined with an earlier formula, printed

    def reassemble(self) -> sp.Expr:
        """``shown`` with every name replaced by what it stands for: the typeset expression."""
        expr = _expand(self.shown, dict(self.names))
        for symbol, value in reversed(self.lets):
            expr = expr.xreplace({symbol: value})
        return expr

    @property
    def exact(self) -> bool:
        return _same(self.reassemble(), self.expr)


def _lines_of(expr: sp.Expr, budget: float, variables=frozenset()) -> list[str] | None:
    """LaTeX lines for ``expr``: one if it fits ``budget``, else a sum broken between terms
    (None where that cannot fit: a long product, quotient or piecewise)."""
    tex = latex(expr, variables)
    if tex_width(tex) <= budget:
        return [tex]
    if not isinstance(expr, sp.Add):
        return None
    terms = _PRINTER._as_ordered_terms(expr, order=None)
    if terms[0].could_extract_minus_sign():
        positive = [t for t in terms if not t.could_extract_minus_sign()]
        if positive:
            terms = [positive[0]] + [t for t in terms if t is not positive[0]]
    pieces = []
    for index, term in enumerate(terms):
        sign = "-" if term.could_extract_minus_sign() else "+"
        body = -term if sign == "-" else term
        piece = latex(body, variables)
        if _PRINTER._needs_add_brackets(body):
            piece = r"\left(%s\right)" % piece
        if index == 0:
            pieces.append(latex(term, variables) if sign == "-" else piece)
        else:
            pieces.append(f"{sign} {piece}")
    lines, current = [], ""
    for piece in pieces:
        candidate = f"{current} {piece}".strip()
        if current and tex_width(candidate) > budget - 2.0:
            lines.append(current)
            current = piece
        else:
            current = candidate
    lines.append(current)
    if any(tex_width(line) > budget - 2.0 for line in lines):
        return None
    return lines


def _expand_lets(expr, lets):
    """``expr`` with every let name (``lets``: (symbol, value) in spec order) replaced by its value."""
    for symbol, value in reversed(lets):
        expr = expr.xreplace({symbol: value})
    return expr


def _with_lets(expr, lets, every_let):
    """``expr`` in terms of the names of ``lets`` (longest value first), each kept only where
    the result expands (through ``every_let``) to the same expression."""
    for symbol, value in sorted(lets, key=lambda sv: (-sp.count_ops(sv[1]), -len(sp.srepr(sv[1])), sv[0].name)):
        candidate = expr.subs(value, symbol)
        if candidate != expr and _same(_expand_lets(candidate, every_let), _expand_lets(expr, every_let)):
            expr = candidate
    return expr


class Typesetter:
    """Lays out the formulas of one loss; the names it introduces are shared by the section."""

    def __init__(self, derivation: Derivation, budget: float = LINE_UNITS):
        spec = derivation.spec
        self.spec, self.budget = spec, budget
        self.lets = tuple((sp.Symbol(name), value) for name, value in spec.lets)
        taken = set(spec.symbols) | {name for name, _ in spec.lets}
        self.letter = next(c for c in "uvqzkmnabc"
                           if not any(re.fullmatch(rf"{c}(_?\d+)?", n) for n in taken))
        self.names: list[tuple[sp.Symbol, sp.Expr]] = []  # symbol -> value, in creation order
        self.full: dict[sp.Expr, sp.Symbol] = {}          # fully expanded value -> symbol

    @property
    def variables(self) -> frozenset:
        """Symbols that go to the left of a comparison: inputs, let names, abbreviations."""
        inputs = {self.spec.symbols[i.name] for i in self.spec.inputs}
        return frozenset(inputs | {s for s, _ in self.lets} | {s for s, _ in self.names})

    def tex(self, expr) -> str:
        return latex(expr, self.variables)

    def lines(self, expr) -> tuple[str, ...]:
        return tuple(_lines_of(expr, self.budget, self.variables) or [self.tex(expr)])

    # let names ------------------------------------------------------------------------------
    def expand_lets(self, expr):
        return _expand_lets(expr, self.lets)

    def with_lets(self, expr, lets=None):
        """``expr`` in terms of the let names (longest first), each kept only where exact."""
        return _with_lets(expr, self.lets if lets is None else lets, self.lets)

    def let_definitions(self) -> list[Definition]:
        out = []
        for index, (symbol, value) in enumerate(self.lets):
            shown = self.with_lets(value, self.lets[:index])
            out.append(Definition(symbol, shown, self.lines(shown), self.tex(symbol)))
        return out

    # abbreviations --------------------------------------------------------------------------
    def expand_names(self, expr):
        return _expand(expr, dict(self.names))

    def name(self, value) -> sp.Symbol:
        full = self.expand_names(value)
        if full not in self.full:
            symbol = sp.Symbol(f"{self.letter}_{len(self.names) + 1}")
            self.names.append((symbol, value))
            self.full[full] = symbol
        return self.full[full]

    def _candidates(self, expr):
        seen, out, names = set(), [], {s for s, _ in self.names}
        for node in sp.preorder_traversal(expr):
            if node is expr or node in seen or not isinstance(node, sp.Expr) or _is_condition(node):
                continue
            seen.add(node)
            if node.is_Atom or node in names or (node.could_extract_minus_sign() and (-node).is_Atom):
                continue
            width = tex_width(latex(node))
            if width >= 4.0:
                out.append((width, node))
        return out

    def shorten(self, expr):
        """Name subexpressions of ``expr`` until it can be laid out within the budget: the
        widest that fits a line by itself first."""
        for _ in range(60):
            if _lines_of(expr, self.budget) is not None:
                break
            candidates = self._candidates(expr)
            if not candidates:
                break
            fitting = [(w, n) for w, n in candidates if _lines_of(n, self.budget) is not None]
            width, node = max(fitting or candidates, key=lambda wn: (wn[0], sp.default_sort_key(wn[1])))
            expr = expr.xreplace({node: self.name(node)})
        return expr

    def share(self, expr):
        """Name the common subexpressions (``sympy.cse``) of a formula that is too long, and
        the ones already named in this section."""
        for full, symbol in sorted(self.full.items(), key=lambda fs: -sp.count_ops(fs[0])):
            expr = expr.xreplace({full: symbol})
        replacements, (reduced,) = sp.cse([expr], symbols=sp.numbered_symbols("_cse"), order="canonical")
        mapping = {}
        for temporary, value in replacements:
            value = value.xreplace(mapping)
            small = _is_condition(value) or tex_width(latex(value)) < 5.0
            mapping[temporary] = value if small else self.name(value)
        return reduced.xreplace(mapping)

    def typeset(self, expr: sp.Expr, lhs: str) -> Formula:
        first_name = len(self.names)
        shown = self.with_lets(expr)
        if _lines_of(shown, self.budget) is None:
            shown = self.shorten(self.share(shown))
        index = first_name
        while index < len(self.names):  # definitions made here, and the ones they make
            symbol, value = self.names[index]
            self.names[index] = (symbol, self.shorten(value))
            index += 1
        where = tuple(Definition(s, v, (), "") for s, v in self.names[first_name:])
        return Formula(lhs, expr, shown, (), where, self.lets, ())

    def finish(self, formulas: list[Formula]) -> list[Formula]:
        """Number the names in reading order, print, and give every formula the whole table."""
        order, values = [], dict(self.names)

        def visit(expr):
            for node in sp.preorder_traversal(expr):
                if isinstance(node, sp.Symbol) and node in values and node not in order:
                    order.append(node)

        for formula in formulas:
            visit(formula.shown)
            for definition in formula.where:
                if definition.symbol in order:
                    visit(values[definition.symbol])
            # names reached only through definitions made here (they come after their user)
            pending = [d.symbol for d in formula.where if d.symbol in order]
            while pending:
                before = len(order)
                for symbol in pending:
                    visit(values[symbol])
                pending = order[before:]
        renaming = {old: sp.Symbol(f"{self.letter}_{k}") for k, old in enumerate(order, 1)}
        self.names = [(renaming[s], v.xreplace(renaming)) for s, v in self.names if s in renaming]
        self.names.sort(key=lambda sv: int(sv[0].name.rsplit("_", 1)[1]))
        table, out = tuple(self.names), []
        for formula in formulas:
            shown = formula.shown.xreplace(renaming)
            mine = sorted((renaming[d.symbol] for d in formula.where if d.symbol in renaming),
                          key=lambda s: int(s.name.rsplit("_", 1)[1]))
            where = tuple(Definition(s, dict(table)[s], self.lines(dict(table)[s]), self.tex(s)) for s in mine)
            used = (shown.free_symbols | set().union(*(d.value.free_symbols for d in where))) & set(dict(table))
            reused = sorted(used - set(mine), key=lambda s: int(s.name.rsplit("_", 1)[1]))
            out.append(Formula(formula.lhs, formula.expr, shown, self.lines(shown), where, self.lets, table,
                               ", ".join(self.tex(s) for s in reused)))
        return out


def typeset(derivation: Derivation, budget: float = LINE_UNITS) -> dict:
    """The formulas of a derivation, laid out: the let definitions, the loss, and per
    prediction the gradient and the Hessian.

    Returns {"lets": [Definition], "loss": Formula, "predictions": [{"name", "grad", "hess"}],
    "setter": Typesetter}. Each Formula's ``expr`` is the very object of ``derivation``
    (``derivation.loss``, ``derivation.grad[k]``, ``derivation.hess[k]``).
    """
    setter = Typesetter(derivation, budget)
    formulas = [setter.typeset(derivation.loss, r"\ell")]
    for prediction, grad, hess in zip(derivation.spec.predictions, derivation.grad, derivation.hess):
        p = latex(derivation.spec.symbols[prediction.name])
        formulas.append(setter.typeset(grad, r"\frac{\partial \ell}{\partial %s}" % p))
        formulas.append(setter.typeset(hess, r"\frac{\partial^{2} \ell}{\partial %s^{2}}" % p))
    formulas = setter.finish(formulas)
    predictions = [{"name": prediction.name, "symbol": latex(derivation.spec.symbols[prediction.name]),
                    "grad": formulas[1 + 2 * k], "hess": formulas[2 + 2 * k]}
                   for k, prediction in enumerate(derivation.spec.predictions)]
    return {"lets": setter.let_definitions(), "loss": formulas[0], "predictions": predictions,
            "setter": setter}


# --- plots, from the kernels --------------------------------------------------------------------

PLOT_INTERVALS = 120  # 121 points per curve, x_i = (lo (n - i) + hi i) / n: 0 is exact


def _nice_ceiling(x: float) -> float:
    """x rounded up to one significant digit (3 -> 3, 4.5 -> 5, 14 -> 20)."""
    power = 10.0 ** math.floor(math.log10(x))
    return math.ceil(x / power * (1 - 1e-12)) * power


def _typical(domain_name: str) -> float | None:
    """A representative value of a domain, at which a target is held fixed in a plot."""
    d = DOMAINS[domain_name]
    if d.values:
        return max(d.values)
    for value in ((0.0, 1.0, 0.5) if d.low == -math.inf else (1.0, 0.5)):
        if d.contains(value):
            return value
    return None


def _values_of(default: float, domain_name: str) -> tuple[float, ...]:
    """Two or three values of a parameter to plot: around its default, inside its domain."""
    d = DOMAINS[domain_name]
    if d.values:
        return (default,)
    if d.low == -math.inf:
        candidates = (default - 1.0, default, default + 1.0)
    elif d.high == math.inf:
        candidates = (default / 2, default, 2 * default) if default > 0 else (0.0, 0.1, 0.25)
    else:
        candidates = (d.low + (default - d.low) / 2, default, default + (d.high - default) / 2)
    out = []
    for value in candidates:
        if d.contains(value) and value not in out:
            out.append(value)
    return tuple(out)


@dataclass(frozen=True)
class PlotSetup:
    """Where a loss is plotted: against the residual p - y (target 0) or its prediction."""

    prediction: str
    residual: bool
    fixed: tuple[tuple[str, float], ...]   # targets held fixed
    lo: float
    hi: float
    param: str | None
    values: tuple[float, ...]

    @property
    def xs(self) -> list[float]:
        n = PLOT_INTERVALS
        return [(self.lo * (n - i) + self.hi * i) / n for i in range(n + 1)]


def plot_setup(spec) -> tuple[PlotSetup | None, str]:
    """How to plot ``spec`` (None and the reason where it is not plotted). With several
    predictions, the loss is plotted against the first, the others held at a typical value."""
    prediction = spec.predictions[0]
    domain = DOMAINS[prediction.domain]
    if domain.values:
        return None, "the prediction takes discrete values"
    fixed = []
    for other in (i for i in spec.inputs if i.name != prediction.name):
        # a target or another prediction sits at the centre of its domain (0 for a real one:
        # the axis is then the residual); other given data (an advantage) at 1 where it can
        value = _typical(other.domain) if other.role != "input" or not DOMAINS[other.domain].contains(1.0) else 1.0
        if value is None:
            return None, f"no typical value for the input {other.name}"
        fixed.append((other.name, value))
    scales = [p.default for p in spec.params if DOMAINS[p.domain].low == 0.0
              and DOMAINS[p.domain].high == math.inf and 0 < p.default <= 1e3]
    reach = _nice_ceiling(3.0 * max([1.0] + scales))
    if domain.low == -math.inf and domain.high == math.inf:
        lo, hi = -reach, reach
    elif domain.high == math.inf:
        lo, hi = domain.low, domain.low + reach
    elif domain.low == -math.inf:
        lo, hi = domain.high - reach, domain.high
    else:
        lo, hi = domain.low, domain.high
    others = [i for i in spec.inputs if i.name != prediction.name]
    residual = (len(others) == 1 and others[0].role == "target" and fixed[0][1] == 0.0 and lo == -hi
                and DOMAINS[others[0].domain].low == -math.inf)
    param = next((p for p in spec.params if not DOMAINS[p.domain].values), None)
    values = _values_of(param.default, param.domain) if param else ()
    return PlotSetup(prediction.name, residual, tuple(fixed), lo, hi,
                     param.name if param else None, values), ""


def _arrays(spec, setup: PlotSetup, predictions):
    import numpy as np

    fixed = dict(setup.fixed)
    predictions = np.asarray(predictions, dtype=np.float64)
    return [predictions if i.name == setup.prediction else np.full(predictions.shape, fixed[i.name])
            for i in spec.inputs]


def _evaluate(loss, spec, setup: PlotSetup, predictions, params: dict):
    """(loss, grad, hess) of the kernel at ``predictions``: one fused kernel call."""
    import numpy as np

    with np.errstate(all="ignore"):
        values = loss.loss_grad_hess(*_arrays(spec, setup, predictions), reduction="none", **params)
    index = [p.name for p in spec.predictions].index(setup.prediction)
    values = [v[index] if isinstance(v, tuple) else v for v in values]  # the plotted prediction's
    return [[float(v) for v in array] for array in values]


def _fmt(x: float) -> str:
    return "%.6g" % x if math.isfinite(x) else "nan"


def _tex_number(x: float) -> str:
    """A kernel value for a table: %.6g, or infinity, or nan as text."""
    if math.isnan(x):
        return r"\text{nan}"
    if math.isinf(x):
        return r"\infty" if x > 0 else r"-\infty"
    return _fmt(x)


def _limits(values: list[float]) -> tuple[float, float]:
    """The y range of a panel: all of the data, less far outliers (a spike is clipped)."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return -1.0, 1.0
    q_lo, q_hi = finite[int(0.02 * (len(finite) - 1))], finite[int(math.ceil(0.98 * (len(finite) - 1)))]
    span = q_hi - q_lo
    low = max(finite[0], q_lo - span) if span > 0 else finite[0]
    high = min(finite[-1], q_hi + span) if span > 0 else finite[-1]
    if high - low <= 1e-9 * max(1.0, abs(high)):
        return low - 1.0, high + 1.0
    pad = 0.06 * (high - low)
    return float(_fmt(low - pad)), float(_fmt(high + pad))


def plot_data(derivation: Derivation, loss, setter: Typesetter | None = None) -> dict | None:
    """Loss, gradient and Hessian of ``loss`` (a :class:`lossgen.runtime.Loss`, the generated
    kernels of ``derivation.spec``) sampled for two or three values of the first parameter,
    and its values at the kinks; None where the loss is not plotted."""
    spec = derivation.spec
    setup, _ = plot_setup(spec)
    if setup is None:
        return None
    setter = setter or Typesetter(derivation)
    symbols = spec.symbols
    p = latex(symbols[setup.prediction])
    xs = setup.xs
    x_tex = latex(symbols[setup.prediction] - symbols[setup.fixed[0][0]]) if setup.residual else p
    quantities = ("loss", "grad", "hess")
    titles = {"loss": r"\ell", "grad": r"\partial \ell / \partial %s" % p,
              "hess": r"\partial^{2} \ell / \partial %s^{2}" % p}
    curves = {q: [] for q in quantities}
    for value in (setup.values or (None,)):
        params = {} if value is None else {setup.param: value}
        results = _evaluate(loss, spec, setup, xs, params)
        label = "" if value is None else "%s = %s" % (latex(symbols[setup.param]), "%g" % value)
        for quantity, ys in zip(quantities, results):
            pairs = [f"({_fmt(x)},{_fmt(y)})" for x, y in zip(xs, ys)]
            rows = [" ".join(pairs[i:i + 8]) for i in range(0, len(pairs), 8)]
            curves[quantity].append({"label": label, "value": value, "rows": rows, "ys": ys})
    panels = []
    for quantity in quantities:
        ymin, ymax = _limits([y for curve in curves[quantity] for y in curve["ys"]])
        panels.append({"quantity": quantity, "title": titles[quantity], "ymin": _fmt(ymin), "ymax": _fmt(ymax),
                       "clip_low": _fmt(ymin - (ymax - ymin)), "clip_high": _fmt(ymax + (ymax - ymin)),
                       "curves": curves[quantity]})
    fixed = ", ".join("%s = %s" % (latex(symbols[name]), "%g" % value) for name, value in setup.fixed)
    others = [prm for prm in spec.params if prm.name != setup.param]
    return {
        "xlabel": x_tex, "xmin": _fmt(setup.lo), "xmax": _fmt(setup.hi), "fixed": fixed,
        "param": latex(symbols[setup.param]) if setup.param else "", "param_name": setup.param or "",
        "others": ", ".join("%s = %s" % (latex(symbols[o.name]), "%g" % o.default) for o in others),
        "points": len(xs), "panels": panels, "legend": bool(setup.values),
        "kinks": _kink_values(derivation, loss, setup, setter),
    }


def _kink_values(derivation: Derivation, loss, setup: PlotSetup, setter: Typesetter) -> list[dict]:
    """Where the kinks are at the default parameters (and the plot's fixed targets), and what
    the kernels compute there: the convention at kinks, as numbers."""
    spec = derivation.spec
    symbol = spec.symbols[setup.prediction]
    values = {spec.symbols[name]: value for name, value in setup.fixed}
    values.update({spec.symbols[prm.name]: sp.Float(prm.default) if prm.default != int(prm.default)
                   else sp.Integer(int(prm.default)) for prm in spec.params})
    rows = []
    for index, kink in enumerate(kink_expressions(derivation), 1):
        at = kink.xreplace(values)
        # only simple kinks (solving through Max, Min or Piecewise is slow), and only where the
        # kink is at a number the kernel can be evaluated at exactly (not at log(6/5))
        if at.free_symbols != {symbol} or sp.count_ops(at) > 10 or at.has(sp.Max, sp.Min, sp.Piecewise):
            continue
        try:
            solutions = sp.solveset(at, symbol, domain=sp.S.Reals)
        except Exception:  # noqa: BLE001 - SymPy cannot solve it: leave the kink out of the table
            continue
        if not isinstance(solutions, sp.FiniteSet):
            continue
        points = sorted(float(s) for s in solutions if s.is_Number and s.is_finite)
        for point in points[:4]:
            results = _evaluate(loss, spec, setup, [point], {})
            rows.append({"index": index, "kink": _kink_equation(setter, kink), "at": _fmt(point),
                         "values": [_tex_number(v[0]) for v in results]})
    return rows


def _kink_equation(setter: Typesetter, kink: sp.Expr) -> str:
    """``kink = 0`` as an equation a reader expects: |r| = delta rather than delta - |r| = 0."""
    kink = setter.with_lets(kink)
    variables = setter.variables
    terms = sp.Add.make_args(kink)
    left = sp.Add(*(t for t in terms if t.free_symbols & variables))
    right = -sp.Add(*(t for t in terms if not t.free_symbols & variables))
    if left == 0:
        left, right = kink, sp.S.Zero
    if left.could_extract_minus_sign():
        left, right = -left, -right
    return "%s = %s" % (setter.tex(left), setter.tex(right))


# --- the documents ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def latex_environment() -> jinja2.Environment:
    """Jinja2 for LaTeX: ``((* block *))``, ``((( variable )))``, ``((# comment #))``."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        block_start_string="((*", block_end_string="*))",
        variable_start_string="(((", variable_end_string=")))",
        comment_start_string="((#", comment_end_string="#))",
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False,
    )
    env.filters["tex"] = lambda text: latex_escape(str(text), breaks=True)
    env.filters["tex_title"] = lambda text: latex_escape(str(text))
    return env


def _function_names(derivation: Derivation) -> set[str]:
    names = set()
    for expr in [derivation.loss, *derivation.grad, *derivation.hess]:
        names |= {type(node).__name__ for node in sp.preorder_traversal(expr)}
    return names


def section_context(derivation: Derivation, spec_path: str, plot: dict | None, plot_note: str = "",
                    layout: dict | None = None) -> dict:
    """Everything ``templates/loss_section.tex.j2`` shows about one loss."""
    spec = derivation.spec
    layout = layout or typeset(derivation)
    setter = layout["setter"]
    symbols = spec.symbols
    functions = _function_names(derivation)
    kinks = kink_expressions(derivation)
    arguments = r",\allowbreak ".join(latex(symbols[i.name]) for i in spec.inputs)
    if spec.params:
        arguments += r";\allowbreak " + r",\allowbreak ".join(latex(symbols[p.name]) for p in spec.params)
    return {
        "marker": MARKER,
        "spec": spec,
        "spec_path": spec_path,
        "label": f"loss:{spec.name}",
        "signature": r"\ell(%s)" % arguments,
        "inputs": [{"symbol": latex(symbols[i.name]), "name": i.name, "role": i.role,
                    "domain": DOMAINS[i.domain].text, "doc": i.doc} for i in spec.inputs],
        "params": [{"symbol": latex(symbols[p.name]), "name": p.name, "default": "%g" % p.default,
                    "domain": DOMAINS[p.domain].text, "doc": p.doc} for p in spec.params],
        "lets": layout["lets"],
        "lets_inline": ", \\quad ".join("%s = %s" % (d.tex, d.lines[0]) for d in layout["lets"])
        if layout["lets"] and all(len(d.lines) == 1 for d in layout["lets"])
        and sum(tex_width(d.lines[0]) + 6 for d in layout["lets"]) < 50 else "",
        "loss": layout["loss"],
        "predictions": layout["predictions"],
        "kinks": [_kink_equation(setter, k) for k in kinks],
        # short kink equations go in the text, long ones in a display (inline math cannot break)
        "kinks_inline": sum(tex_width(_kink_equation(setter, k)) + 3 for k in kinks) < 40,
        "has_sign": bool(functions & {"Abs", "sign"}),
        "has_heaviside": bool(functions & {"Heaviside", "Max", "Min"}),
        "has_piecewise": "Piecewise" in functions,
        "plot": plot,
        "plot_note": plot_note,
    }


def render_section(derivation: Derivation, spec_path: str, loss=None) -> str:
    """The ``.tex`` fragment of one loss; ``loss`` (its generated kernels) gives the plot."""
    layout = typeset(derivation)
    setup, note = plot_setup(derivation.spec)
    plot = plot_data(derivation, loss, layout["setter"]) if (loss is not None and setup) else None
    if setup and loss is None:
        note = "no kernels given"
    context = section_context(derivation, spec_path, plot, note, layout)
    return latex_environment().get_template("loss_section.tex.j2").render(**context)


def family_title(family: str) -> str:
    """The heading of a family folder: "robust" -> "Robust", "gan" -> "GAN" (short names are
    acronyms), "time_series" -> "Time series"."""
    words = family.replace("_", " ").replace("-", " ")
    return words.upper() if len(words) <= 3 else words.capitalize()


def render_reference(entries: list[tuple[str, str, str]], version: str) -> str:
    """The whole document: (name, family, title) of every loss, grouped by family."""
    families: dict[str, list] = {}
    for name, family, title in sorted(entries, key=lambda e: (e[1], e[0])):
        families.setdefault(family, []).append({"name": name, "title": title})
    return latex_environment().get_template("reference.tex.j2").render(
        marker=MARKER, version=version, count=len(entries),
        families=[{"name": f, "title": family_title(f), "losses": losses} for f, losses in families.items()])


# --- row-wise losses -----------------------------------------------------------------------

class RowLatexPrinter(LossLatexPrinter):
    """Reductions over a row: sum_k, max_k, logsumexp_k, x|_{k=y}, [k = y], and C."""

    def _print_rowsum(self, expr, exp=None):
        return r"\sum_k \left(%s\right)" % self._print(expr.args[0])

    def _print_rowmax(self, expr, exp=None):
        return r"\max_k \left(%s\right)" % self._print(expr.args[0])

    def _print_rowmin(self, expr, exp=None):
        return r"\min_k \left(%s\right)" % self._print(expr.args[0])

    def _print_logsumexp(self, expr, exp=None):
        return r"\operatorname{logsumexp}_k \left(%s\right)" % self._print(expr.args[0])

    def _print_take(self, expr, exp=None):
        return r"\left.\left(%s\right)\right|_{k=%s}" % (self._print(expr.args[0]), self._print(expr.args[1]))

    def _print_onehot(self, expr, exp=None):
        return r"[k = %s]" % self._print(expr.args[0])


def render_row_section(spec, spec_path: str) -> str:
    """The ``.tex`` fragment of one row-wise loss: inputs with their shapes, the loss, outputs."""
    from .reductions import ROW_SIZE, take
    printer = RowLatexPrinter({"symbol_names": {ROW_SIZE: "C"}})
    inputs = [{"symbol": printer.doprint(spec.symbols[i.name]), "role": i.role, "shape": i.shape,
               "default": "" if i.default is None else f"{i.default:g}", "domain": i.domain, "doc": i.doc}
              for i in spec.inputs]
    params = [{"symbol": printer.doprint(spec.symbols[p.name]), "default": f"{p.default:g}", "domain": p.domain,
               "doc": p.doc} for p in spec.params]
    predictions = ", ".join(f"${printer.doprint(spec.symbols[p.name])}$" for p in spec.predictions)
    return latex_environment().get_template("row_section.tex.j2").render(
        spec=spec, spec_path=spec_path, marker=MARKER, label=f"loss:{spec.name}", inputs=inputs, params=params,
        loss_lines=_row_loss_lines(spec, printer), takes=spec.loss.has(take), predictions=predictions,
        several=len(spec.predictions) > 1)


def _row_loss_lines(spec, printer) -> list[tuple[str, str]]:
    """(left, right) of the loss's display: the loss as one line where it fits, else in terms of
    the spec's let names (as the elementwise sections, each name kept only where exact),
    followed by the definitions of the names it uses."""
    whole = printer.doprint(spec.loss)
    if tex_width(whole) <= LINE_UNITS or not spec.lets:
        return [(r"\ell", whole)]
    lets = tuple((sp.Symbol(name), value) for name, value in spec.lets)
    shown = _with_lets(spec.loss, lets, lets)
    used, lines = shown.free_symbols, []
    for index in reversed(range(len(lets))):
        symbol, value = lets[index]
        if symbol in used:
            definition = _with_lets(value, lets[:index], lets)
            used |= definition.free_symbols
            lines.insert(0, (printer.doprint(symbol), printer.doprint(definition)))
    return [(r"\ell", printer.doprint(shown))] + lines
