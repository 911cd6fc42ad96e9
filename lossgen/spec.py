"""Stage 1, spec -> ``LossSpec``: read a TOML spec file and build its SymPy expression.

A spec file is data. Expression text is parsed with :mod:`ast` and turned into SymPy by a
whitelist (numbers, declared names, arithmetic, comparisons, and the function table of
:mod:`lossgen.vocabulary`); nothing is ever passed to ``eval``, ``exec`` or ``sympify``.
Every error names the file, the field and, where it can, the column.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import hashlib
import keyword
import math
import operator
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import sympy as sp

from .domains import DOMAINS, domain_names
from .reductions import REDUCTION_CLASSES, has_reductions, onehot, take
from .vocabulary import CONSTANTS, FUNCTIONS


class SpecError(ValueError):
    """A spec file is invalid; the message names the file, the field and the column."""

    def __init__(self, path, where: str, message: str, column: int | None = None):
        self.path, self.where, self.column = str(path), where, column
        position = f", column {column}" if column is not None else ""
        super().__init__(f"{path}: {where}{position}: {message}")


# Roles of inputs: whether the loss is differentiated with respect to them.
ROLES = {
    "target": "observed value; not differentiated",
    "prediction": "model output; gradient and Hessian are taken with respect to it",
    "input": "other given data (an advantage, a reference model's log-probability); not differentiated",
}

# Names used by the generated code and the runtime API, which a spec may not redefine.
GENERATED_IDENTIFIERS = frozenset({
    "np", "numpy", "math", "numba", "prange", "njit", "SPEC",
    "self", "reduction", "sample_weight", "check_inputs", "full",
})

TOP_LEVEL_KEYS = {"name", "title", "summary", "references", "inputs", "params", "let", "loss", "notes",
                  "special_cases"}
INPUT_KEYS = {"role", "domain", "doc", "axis", "shared", "default", "specialise"}
PARAM_KEYS = {"default", "domain", "doc", "specialise"}
LOSS_KEYS = {"expr"}


@dataclass(frozen=True)
class Input:
    name: str
    role: str
    domain: str
    doc: str = ""
    axis: str | None = None   # row-wise losses: the axis the input runs along (shape (N, C))
    shared: bool = False      # with an axis: one vector for all rows (shape (C,)), e.g. class weights
    default: float | None = None  # a shared input may be left out: all elements take this value
    specialise: bool = False  # kernels are also generated with it left out (at its default)

    @property
    def shape(self) -> str:
        """The array shape, as the docs and errors state it."""
        if self.axis is None:
            return "(N,)"
        return "(C,)" if self.shared else "(N, C)"


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    domain: str
    doc: str = ""
    specialise: bool = False  # kernels are also generated with it at its default


@dataclass(frozen=True)
class LossSpec:
    """A parsed spec: metadata, symbols and the loss as a SymPy expression."""

    name: str
    title: str
    summary: str
    family: str
    path: str
    references: tuple[str, ...]
    notes: str
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    symbols: dict[str, sp.Symbol] = field(repr=False)
    lets: tuple[tuple[str, sp.Expr], ...] = field(repr=False)
    loss: sp.Expr = field(repr=False)          # with every let binding substituted
    source_hash: str = ""                       # sha256 of the file's bytes
    special_cases: tuple[str, ...] = ()         # documentation: e.g. "beta = 0 gives mae"

    @property
    def predictions(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.role == "prediction")

    @property
    def axis(self) -> str | None:
        """The axis of a row-wise loss (``"class"``, ``"feature"``), None for an elementwise one."""
        return next((i.axis for i in self.inputs if i.axis), None)

    @property
    def rowwise(self) -> bool:
        return self.axis is not None

    @property
    def arguments(self) -> tuple[str, ...]:
        """Names of the scalar kernel arguments: inputs, then parameters, in spec order."""
        return tuple(i.name for i in self.inputs) + tuple(p.name for p in self.params)

    @property
    def specialised_names(self) -> tuple[str, ...]:
        """Inputs, then parameters, marked ``specialise = true``."""
        return tuple(e.name for e in self.inputs + self.params if e.specialise)

    @property
    def specialised_module(self) -> str | None:
        """The module name of the kernels specialised at the defaults (a loss name cannot start
        with ``_``, so it never collides with one), or None where nothing is marked."""
        return f"_{self.name}_defaults" if self.specialised_names else None

    def at_defaults(self) -> LossSpec:
        """This spec with every name marked ``specialise = true`` replaced by its default (a
        marked shared input by its default in every element) and removed from the inputs and
        parameters: the loss the specialised kernels compute."""
        marked = {e.name: e.default for e in self.inputs + self.params if e.specialise}
        values = {self.symbols[name]: _exact(default) for name, default in marked.items()}
        shown = ", ".join(f"{name} = {default:g}" for name, default in marked.items())
        return replace(
            self,
            title=f"{self.title}, specialised at {shown}",
            inputs=tuple(i for i in self.inputs if i.name not in marked),
            params=tuple(p for p in self.params if p.name not in marked),
            symbols={name: symbol for name, symbol in self.symbols.items() if name not in marked},
            lets=tuple((name, value.xreplace(values)) for name, value in self.lets),
            loss=self.loss.xreplace(values),
        )


def _exact(value: float) -> sp.Expr:
    """A default as SymPy sees it: an integer exactly (so that 0 * x and 1 * x simplify), else
    the binary64 value, as a literal in a spec is read."""
    return sp.Integer(int(value)) if float(value).is_integer() else sp.Float(value)


# --- expression parsing --------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: sp.Not}
_COMPARE = {ast.Lt: sp.Lt, ast.LtE: sp.Le, ast.Gt: sp.Gt, ast.GtE: sp.Ge, ast.Eq: sp.Eq, ast.NotEq: sp.Ne}
_BOOL = {ast.And: sp.And, ast.Or: sp.Or}
_NOT_FINITE = (sp.zoo, sp.oo, -sp.oo, sp.nan)
_LARGEST_FLOAT = sys.float_info.max
_MAX_EXACT_BITS = 10_000  # the largest exact number (numerator or denominator) a power may make
_SYNTAX_NAMES = {ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Lambda: "lambda",
                 ast.List: "a list", ast.Dict: "a dict", ast.Set: "a set", ast.JoinedStr: "an f-string",
                 ast.IfExp: "a conditional expression (use Piecewise)", ast.Starred: "*-unpacking"}


def _is_condition(value) -> bool:
    """A comparison, a logical combination of them, or True/False (a Symbol is not one,
    although SymPy lets a Symbol stand in logic)."""
    from sympy.logic.boolalg import BooleanAtom, BooleanFunction
    return isinstance(value, (sp.core.relational.Relational, BooleanFunction, BooleanAtom))


class _ExpressionBuilder:
    """Turn an ``ast`` tree into SymPy, accepting only whitelisted nodes."""

    def __init__(self, path, where: str, names: dict[str, sp.Expr], indent: int = 0):
        self.path, self.where, self.names, self.indent = path, where, names, indent

    def fail(self, node, message):
        column = getattr(node, "col_offset", None)
        if column is not None and getattr(node, "lineno", 1) == 1:
            column += self.indent  # columns count in the field's text, before it was stripped
        raise SpecError(self.path, self.where, message, None if column is None else column + 1)

    def check_power(self, node, base, exponent):
        """Refuse exact powers too large to compute (``9**9**9`` would hang SymPy)."""
        if getattr(base, "is_Rational", False) and getattr(exponent, "is_Rational", False) \
                and abs(base) not in (0, 1):
            bits = max(base.p.bit_length(), base.q.bit_length()) * abs(exponent)
            if bits > _MAX_EXACT_BITS:
                self.fail(node, f"exact number too large (about {int(bits)} bits); write it as a float")

    def build(self, node, allow_tuple=False):
        try:
            result = self._build(node, allow_tuple)
        except SpecError:
            raise
        except (TypeError, ValueError) as error:  # SymPy refuses the combination, e.g. p + (p > 0)
            self.fail(node, f"invalid expression: {error}")
        if isinstance(result, sp.Basic) and result.has(*_NOT_FINITE):
            self.fail(node, "the expression is not finite (a division by zero, or log(0)?)")
        if isinstance(result, sp.Basic) and any(abs(n) > _LARGEST_FLOAT for n in result.atoms(sp.Number)):
            self.fail(node, "a constant here exceeds the float64 range (about 1.8e308)")
        return result

    def _build(self, node, allow_tuple):
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.build(node.left), self.build(node.right)
            if isinstance(node.op, ast.Pow):
                self.check_power(node, left, right)
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return sp.Not(self.condition(node.operand))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.build(node.operand))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.BoolOp):
            return _BOOL[type(node.op)](*(self.condition(v) for v in node.values))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Tuple) and allow_tuple:
            return tuple(self.build(e) for e in node.elts)
        if isinstance(node, ast.Tuple):
            self.fail(node, "a tuple is only allowed as a Piecewise branch (expr, condition)")
        what = _SYNTAX_NAMES.get(type(node), f"syntax {type(node).__name__}")
        if isinstance(node, ast.BinOp):
            what = f"operator {type(node.op).__name__}"
        self.fail(node, f"{what} is not allowed in a loss expression")

    def condition(self, node):
        """A sub-expression that must be a condition (an operand of and, or, not)."""
        value = self.build(node)
        if not _is_condition(value):
            self.fail(node, "expected a condition (a comparison, or and/or/not of comparisons)")
        return value

    def constant(self, node):
        value = node.value
        if isinstance(value, bool):
            return sp.true if value else sp.false
        if isinstance(value, int):
            return sp.Integer(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(node, f"number {value!r} is not finite")
            return sp.Float(value)  # the exact binary64 value, as the kernel sees it
        self.fail(node, f"constant {value!r} is not a number")

    def name(self, node):
        if node.id in self.names:
            return self.names[node.id]
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            self.fail(node, f"'{node.id}' is a function; call it as {node.id}(...)")
        self.fail(node, f"undeclared name '{node.id}'{_suggest(node.id, self.names)}; "
                        "declare it under [inputs], [params] or [let]")

    def compare(self, node):
        for op in node.ops:
            if type(op) not in _COMPARE:
                self.fail(node, f"operator {type(op).__name__} is not allowed in a loss expression")
        terms = [self.build(node.left)] + [self.build(c) for c in node.comparators]
        relations = [_COMPARE[type(op)](a, b) for op, a, b in zip(node.ops, terms, terms[1:])]
        return relations[0] if len(relations) == 1 else sp.And(*relations)

    def call(self, node):
        if not isinstance(node.func, ast.Name):
            self.fail(node, "only functions from the table may be called, by plain name")
        name = node.func.id
        if name not in FUNCTIONS:
            self.fail(node, f"unknown function '{name}'{_suggest(name, FUNCTIONS)}; "
                            f"known functions: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords:
            self.fail(node, f"{name}() takes no keyword arguments")
        function = FUNCTIONS[name]
        fewest, most = function.arity
        count = len(node.args)
        if count < fewest or (most is not None and count > most):
            expected = str(fewest) if fewest == most else f"{fewest} to {most or 'any number of'}"
            self.fail(node, f"{name}() takes {expected} argument(s), got {count}")
        if name == "Piecewise":
            return self.piecewise(node)
        return function.build(*(self.build(a) for a in node.args))

    def piecewise(self, node):
        branches = []
        for arg in node.args:
            branch = self.build(arg, allow_tuple=True)
            if not (isinstance(branch, tuple) and len(branch) == 2):
                self.fail(arg, "each Piecewise branch is a pair (expr, condition)")
            branches.append(branch)
        if branches[-1][1] is not sp.true:
            self.fail(node.args[-1], "the last Piecewise branch must be (expr, True), the otherwise case")
        return sp.Piecewise(*branches)


def _suggest(name, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_expression(text: str, names: dict[str, sp.Expr], path="<string>", where="expr") -> sp.Expr:
    """Parse ``text`` (SymPy syntax) into a SymPy expression over ``names``, by whitelist."""
    if not isinstance(text, str):
        raise SpecError(path, where, f"expected an expression string, got {type(text).__name__}")
    head = text[:len(text) - len(text.lstrip())]
    indent = len(head.rsplit("\n", 1)[-1])  # stripped from the first line; columns add it back
    try:
        tree = ast.parse(text.strip(), mode="eval")
        return _ExpressionBuilder(path, where, names, indent).build(tree.body)
    except SyntaxError as error:
        column = None if not error.offset else error.offset + (indent if error.lineno == 1 else 0)
        raise SpecError(path, where, f"syntax error: {error.msg}", column) from None
    except (RecursionError, MemoryError):  # Python's parser, or ours, on absurdly deep nesting
        raise SpecError(path, where, "the expression is nested too deeply") from None


# --- spec files ----------------------------------------------------------------------------

def _check_identifier(path, where: str, name: str, kind: str):
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(path, where, f"{kind} name {name!r} is not a valid identifier")
    problem = None
    if keyword.iskeyword(name):
        problem = "is a Python keyword"
    elif name.startswith("_"):
        problem = "starts with an underscore (reserved for generated code)"
    elif name in GENERATED_IDENTIFIERS:
        problem = "would shadow an identifier of the generated code"
    elif name in FUNCTIONS or name in CONSTANTS:
        problem = "is a function or constant of the spec language"
    elif hasattr(builtins, name):
        problem = "would shadow a Python builtin used by the generated code"
    if problem:
        raise SpecError(path, where, f"{kind} name '{name}' {problem}; choose another name")


def _check_keys(path, where: str, table, allowed: set):
    if not isinstance(table, dict):
        raise SpecError(path, where, f"expected a table, got {type(table).__name__}")
    for key in table:
        if key not in allowed:
            raise SpecError(path, f"{where}.{key}" if where else key,
                            f"unknown key '{key}'{_suggest(key, allowed)}; allowed: {', '.join(sorted(allowed))}")


def _string(path, where, value, required=True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise SpecError(path, where, "expected a non-empty string")
    return value


def _flag(path, where, value) -> bool:
    if not isinstance(value, bool):
        raise SpecError(path, where, f"expected true or false, got {value!r}")
    return value


def _domain(path, where, value, default: str) -> str:
    value = default if value is None else value
    if value not in DOMAINS:
        raise SpecError(path, where, f"unknown domain {value!r}{_suggest(str(value), DOMAINS)}; "
                                     f"known: {domain_names()}")
    return value


def load_spec(path) -> LossSpec:
    """Read and validate one spec file; raise :class:`SpecError` on any problem."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SpecError(path, "TOML", str(error)) from None
    return spec_from_dict(data, path, source_hash=hashlib.sha256(raw).hexdigest())


def spec_from_dict(data: dict, path, source_hash: str = "") -> LossSpec:
    path = Path(path)
    _check_keys(path, "", data, TOP_LEVEL_KEYS)
    for required in ("name", "inputs", "loss"):
        if required not in data:
            raise SpecError(path, required, "missing required key")
    name = data["name"]
    _check_identifier(path, "name", name, "loss")
    if path.suffix == ".toml" and path.stem != name:
        raise SpecError(path, "name", f"loss name '{name}' must match the file name '{path.stem}.toml'")

    symbols: dict[str, sp.Symbol] = {}
    inputs = []
    _check_keys(path, "inputs", data["inputs"], set(data["inputs"]))
    for input_name, entry in data["inputs"].items():
        where = f"[inputs] {input_name}"
        _check_identifier(path, where, input_name, "input")
        _check_keys(path, where, entry, INPUT_KEYS)
        role = entry.get("role")
        if role not in ROLES:
            raise SpecError(path, f"{where}.role", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        domain = _domain(path, f"{where}.domain", entry.get("domain"), "real")
        axis, shared = entry.get("axis"), entry.get("shared", False)
        if axis is not None and not (isinstance(axis, str) and axis.isidentifier()):
            raise SpecError(path, f"{where}.axis", f"expected an axis name such as \"class\", got {axis!r}")
        if not isinstance(shared, bool) or (shared and axis is None):
            raise SpecError(path, f"{where}.shared", "shared = true (one vector for all rows) needs an axis")
        if shared and role == "prediction":
            raise SpecError(path, f"{where}.shared", "a prediction cannot be shared by all rows")
        if domain == "class_index" and (axis is not None or role == "prediction"):
            raise SpecError(path, f"{where}.domain", "a class index is one integer per row: "
                                                     "a target or input without an axis")
        default = entry.get("default")
        if default is not None and (not shared or isinstance(default, bool) or not isinstance(default, (int, float))
                                    or not DOMAINS[domain].contains(float(default))):
            raise SpecError(path, f"{where}.default", "only a shared input (shared = true) may have a default, "
                                                      f"a number in its domain; got {default!r}")
        specialise = _flag(path, f"{where}.specialise", entry.get("specialise", False))
        if specialise and default is None:
            raise SpecError(path, f"{where}.specialise", "only a shared input with a default (which callers may "
                                                         "leave out) can be specialised")
        inputs.append(Input(input_name, role, domain, _string(path, f"{where}.doc", entry.get("doc"), False),
                            axis, shared, None if default is None else float(default), specialise))
        symbols[input_name] = sp.Symbol(input_name, **DOMAINS[domain].assumptions)
    if not any(i.role == "prediction" for i in inputs):
        raise SpecError(path, "[inputs]", "declare at least one input with role = \"prediction\"")
    axes = sorted({i.axis for i in inputs if i.axis})
    if len(axes) > 1:
        raise SpecError(path, "[inputs]", f"all row inputs must share one axis, got {', '.join(axes)}")
    if axes and not any(i.axis and i.role == "prediction" for i in inputs):
        raise SpecError(path, "[inputs]", "a row-wise loss needs a prediction with the axis")

    params = []
    param_table = data.get("params", {})
    _check_keys(path, "params", param_table, set(param_table))
    for param_name, entry in param_table.items():
        where = f"[params] {param_name}"
        _check_identifier(path, where, param_name, "parameter")
        if param_name in symbols:
            raise SpecError(path, where, f"'{param_name}' is already declared as an input")
        _check_keys(path, where, entry, PARAM_KEYS)
        default = entry.get("default")
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise SpecError(path, f"{where}.default", f"expected a number, got {default!r}")
        domain = _domain(path, f"{where}.domain", entry.get("domain"), "real")
        if not DOMAINS[domain].contains(float(default)):
            raise SpecError(path, f"{where}.default",
                            f"default {default!r} is outside the domain '{domain}' ({DOMAINS[domain].text})")
        params.append(Param(param_name, float(default), domain, _string(path, f"{where}.doc", entry.get("doc"), False),
                            _flag(path, f"{where}.specialise", entry.get("specialise", False))))
        symbols[param_name] = sp.Symbol(param_name, **DOMAINS[domain].assumptions)

    names: dict[str, sp.Expr] = dict(symbols)
    lets = []
    let_table = data.get("let", {})
    _check_keys(path, "let", let_table, set(let_table))
    for let_name, text in let_table.items():
        where = f"[let] {let_name}"
        _check_identifier(path, where, let_name, "let")
        if let_name in names:
            raise SpecError(path, where, f"'{let_name}' is already declared")
        value = parse_expression(text, names, path, where)
        if _is_condition(value):
            raise SpecError(path, where, "a let binding must be a number, not a condition")
        names[let_name] = value
        lets.append((let_name, value))

    _check_keys(path, "loss", data["loss"], LOSS_KEYS)
    if "expr" not in data["loss"]:
        raise SpecError(path, "[loss] expr", "missing required key")
    loss = parse_expression(data["loss"]["expr"], names, path, "[loss] expr")
    if _is_condition(loss):
        raise SpecError(path, "[loss] expr", "the loss must be a number, not a condition")
    _check_rows(path, inputs, symbols, loss)
    used = loss.free_symbols
    for p in (i for i in inputs if i.role == "prediction"):
        if symbols[p.name] not in used:
            raise SpecError(path, "[loss] expr", f"the loss does not depend on the prediction '{p.name}'")

    references = data.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise SpecError(path, "references", "expected a list of strings")
    special_cases = data.get("special_cases", [])
    if not isinstance(special_cases, list) or not all(isinstance(c, str) and c.strip() for c in special_cases):
        raise SpecError(path, "special_cases", "expected a list of non-empty strings")
    return LossSpec(
        name=name,
        title=_string(path, "title", data.get("title", name)),
        summary=_string(path, "summary", data.get("summary"), required=False),
        family=path.parent.name,
        path=str(path),
        references=tuple(references),
        notes=_string(path, "notes", data.get("notes"), required=False),
        inputs=tuple(inputs),
        params=tuple(params),
        symbols=symbols,
        lets=tuple(lets),
        loss=loss,
        source_hash=source_hash,
        special_cases=tuple(special_cases),
    )


def _check_rows(path, inputs, symbols, loss):
    """A row-wise loss is one number per row: its axis inputs appear only inside reductions,
    ``take`` and ``onehot`` index with a class-index input, and reductions need an axis."""
    row_inputs = {symbols[i.name] for i in inputs if i.axis}
    indices = {symbols[i.name] for i in inputs if i.domain == "class_index"}
    where = "[loss] expr"
    if not row_inputs:
        if has_reductions(loss):
            raise SpecError(path, where, "reductions (sum, mean, logsumexp, take, ...) need an input "
                                         "declared over an axis, e.g. axis = \"class\"")
        return
    for node in sp.preorder_traversal(loss):
        if isinstance(node, (take, onehot)) and node.args[-1] not in indices:
            name = type(node).__name__
            raise SpecError(path, where, f"{name}(..., y) needs y to be an input with domain = \"class_index\"")
        if isinstance(node, REDUCTION_CLASSES) and not (node.args[0].free_symbols & row_inputs
                                                       or node.args[0].has(onehot, *REDUCTION_CLASSES)):
            raise SpecError(path, where, f"{node} reduces an expression that does not run along the axis")

    def outside(expr) -> bool:  # an axis input, or onehot, outside every reduction
        if isinstance(expr, REDUCTION_CLASSES):
            return False
        if expr in row_inputs or isinstance(expr, onehot):
            return True
        return any(outside(a) for a in expr.args)

    if outside(loss):
        names = ", ".join(sorted(str(s) for s in row_inputs))
        raise SpecError(path, where, f"the loss must be one number per row: the axis inputs ({names}) may "
                                     "appear only inside a reduction such as sum(...), mean(...) or logsumexp(...)")


def find_spec_files(folder) -> list[Path]:
    """Spec files under ``folder`` (``<family>/<name>.toml``), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"spec folder {folder} does not exist")
    return sorted(folder.rglob("*.toml"), key=lambda p: p.relative_to(folder).as_posix())


def load_specs(folder) -> list[LossSpec]:
    """Load every spec under ``folder``; loss names must be unique."""
    specs, seen = [], {}
    for path in find_spec_files(folder):
        spec = load_spec(path)
        if spec.name in seen:
            raise SpecError(path, "name", f"duplicate loss name '{spec.name}', also defined in {seen[spec.name]}")
        seen[spec.name] = path
        specs.append(spec)
    return specs
