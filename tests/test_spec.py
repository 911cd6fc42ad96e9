"""Spec parsing (lossgen/spec.py) and its errors.

Every test writes small spec files into ``tmp_path``. Expected SymPy expressions are built by
hand with SymPy, never by the parser under test. Every error must name the file, the field
and, where it can, the 1-based column of the offending node within the expression string.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import sympy as sp
from sympy.codegen.cfunctions import log1p

from lossgen.generate import render_all
from lossgen.spec import Input, Param, SpecError, load_spec, load_specs, parse_expression

# --- helpers -------------------------------------------------------------------------------

HUBER_EXPR = "Piecewise((r**2/2, Abs(r) < delta), (delta*(Abs(r) - delta/2), True))"

DEFAULT_PARTS = {
    "top": ('title = "Test loss"\n'
            'summary = "A small loss for the tests."\n'
            'references = ["A. Author, A Title, 2020"]\n'),
    "inputs": ('y = { role = "target", doc = "observed value" }\n'
               'p = { role = "prediction" }\n'),
    "params": 'delta = { default = 2.0, domain = "positive", doc = "Where it turns linear." }\n',
    "let": 'r = "p - y"\n',
    "loss": f"expr = {json.dumps(HUBER_EXPR)}\n",
}


def toml_string(text: str) -> str:
    """A TOML basic string holding ``text`` (JSON's escapes are valid TOML for ASCII)."""
    return json.dumps(text)


def write_spec(folder, name="test_loss", *, family="custom", file_name=None, expr=None, **parts):
    """Write a valid minimal spec to ``folder/family/file_name.toml``; any part may be replaced.

    ``parts`` replaces one of DEFAULT_PARTS (the text of that table, or of the top-level keys
    for ``top``); ``None`` leaves the table out. ``expr`` replaces only the loss expression.
    """
    chosen = dict(DEFAULT_PARTS, **parts)
    if expr is not None:
        chosen["loss"] = f"expr = {toml_string(expr)}\n"
    text = f'name = "{name}"\n'
    if chosen["top"] is not None:
        text += chosen["top"]
    for table in ("inputs", "params", "let", "loss"):
        if chosen[table] is not None:
            text += f"\n[{table}]\n{chosen[table]}"
    path = folder / family / f"{file_name or name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def spec_error(path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def assert_names(error: SpecError, path, where: str, column: int | None = None):
    """The error names the file, the field and (when given) the column, as attributes and in text."""
    message = str(error)
    assert error.path == str(path)
    assert str(path) in message
    assert error.where == where
    assert where in message
    if column is not None:
        assert error.column == column
        assert f"column {column}" in message


def column_of(expr: str, fragment: str) -> int:
    """1-based column of ``fragment`` in ``expr``, computed here, independently of the parser."""
    assert expr.count(fragment) == 1, "ambiguous fragment"
    return expr.index(fragment) + 1


y, p = sp.symbols("y p", real=True)
delta = sp.Symbol("delta", positive=True)


# --- valid specs ---------------------------------------------------------------------------

def test_valid_spec_parses(tmp_path):
    path = write_spec(tmp_path)
    spec = load_spec(path)

    assert spec.name == "test_loss"
    assert spec.title == "Test loss"
    assert spec.summary == "A small loss for the tests."
    assert spec.family == "custom"
    assert spec.path == str(path)
    assert spec.references == ("A. Author, A Title, 2020",)
    assert spec.source_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.inputs == (Input("y", "target", "real", "observed value"), Input("p", "prediction", "real", ""))
    assert spec.params == (Param("delta", 2.0, "positive", "Where it turns linear."),)
    assert [i.name for i in spec.predictions] == ["p"]
    assert spec.arguments == ("y", "p", "delta")

    # symbols carry their domain's assumptions, so they equal hand-made ones
    assert spec.symbols == {"y": y, "p": p, "delta": delta}
    assert spec.symbols["delta"].is_positive

    r = p - y
    assert spec.lets == (("r", r),)
    expected = sp.Piecewise((r**2 / 2, sp.Abs(r) < delta), (delta * (sp.Abs(r) - delta / 2), True))
    assert spec.loss == expected
    assert spec.loss.free_symbols == {y, p, delta}


def test_valid_spec_chained_lets_and_functions(tmp_path):
    path = write_spec(
        tmp_path,
        params='scale = { default = 3, domain = "positive" }\n',
        let='r = "(p - y)/scale"\ns = "r**2"\n',
        expr="scale**2*log1p(s/2) + 0.1*Abs(r) + exp(-s)",
    )
    spec = load_spec(path)
    scale = sp.Symbol("scale", positive=True)
    r = (p - y) / scale
    s = r**2
    assert spec.params == (Param("scale", 3.0, "positive", ""),)
    assert isinstance(spec.params[0].default, float)
    assert spec.lets == (("r", r), ("s", s))  # later lets see earlier ones, substituted
    expected = scale**2 * log1p(s / 2) + sp.Float(0.1) * sp.Abs(r) + sp.exp(-s)
    assert spec.loss == expected
    # the float constant is the exact binary64 value the kernel will see
    assert spec.loss.atoms(sp.Float) == {sp.Float(0.1)}


@pytest.mark.parametrize("text, expected", [
    ("p**2 - 3*p + 1", p**2 - 3 * p + 1),
    ("-p + +y", -p + y),
    ("p/2", sp.Rational(1, 2) * p),
    ("clip(p, 0, 1)", sp.Min(sp.Max(p, 0), 1)),
    ("relu(p - y)", sp.Max(p - y, 0)),
    ("Max(p, y, 1)", sp.Max(p, y, 1)),
    ("pi*p + E**y", sp.pi * p + sp.exp(y)),
    ("sqrt(p**2 + 1)", sp.sqrt(p**2 + 1)),
    ("Piecewise((p, 2 < p <= 3), (y, True))",
     sp.Piecewise((p, sp.And(sp.Lt(2, p), sp.Le(p, 3))), (y, True))),
    ("Piecewise((p, (p > 0) and (y > 0)), (0, True))",
     sp.Piecewise((p, sp.And(sp.Gt(p, 0), sp.Gt(y, 0))), (0, True))),
])
def test_parse_expression_builds_expected_sympy(text, expected):
    assert parse_expression(text, {"p": p, "y": y}) == expected


# --- TOML and structure errors -------------------------------------------------------------

def test_toml_syntax_error(tmp_path):
    path = tmp_path / "custom" / "broken.toml"
    path.parent.mkdir()
    path.write_text('name = "broken\ntitle = "x"\n', encoding="utf-8")
    error = spec_error(path)
    assert_names(error, path, "TOML")
    assert "line 1" in str(error) and "column" in str(error)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "custom" / "binary.toml"
    path.parent.mkdir()
    path.write_bytes(b'name = "\xff\xfe"\n')
    assert_names(spec_error(path), path, "TOML")


def test_unknown_top_level_key_suggests(tmp_path):
    path = write_spec(tmp_path, top='title = "T"\nsumary = "typo"\n')
    error = spec_error(path)
    assert_names(error, path, "sumary")
    assert "did you mean 'summary'" in str(error)


def test_unknown_input_key(tmp_path):
    path = write_spec(tmp_path, inputs='y = { role = "target" }\np = { rol = "prediction" }\n')
    error = spec_error(path)
    assert_names(error, path, "[inputs] p.rol")
    assert "did you mean 'role'" in str(error)


def test_unknown_role(tmp_path):
    path = write_spec(tmp_path, inputs='y = { role = "target" }\np = { role = "predicton" }\n')
    error = spec_error(path)
    assert_names(error, path, "[inputs] p.role")
    assert "'predicton'" in str(error) and "prediction" in str(error)


@pytest.mark.parametrize("table, where", [
    ("params", "[params] delta.domain"),
    ("inputs", "[inputs] y.domain"),
])
def test_unknown_domain_suggests(tmp_path, table, where):
    if table == "params":
        path = write_spec(tmp_path, params='delta = { default = 2.0, domain = "postive" }\n')
    else:
        path = write_spec(tmp_path, inputs='y = { role = "target", domain = "postive" }\np = { role = "prediction" }\n')
    error = spec_error(path)
    assert_names(error, path, where)
    assert "'postive'" in str(error) and "did you mean 'positive'" in str(error)


@pytest.mark.parametrize("default, domain", [
    ("-1", "positive"),
    ("0", "positive"),
    ("-0.5", "nonnegative"),
    ("1.5", "unit_interval"),
    ("0.5", "label01"),
    ("nan", "real"),
    ("inf", "real"),
])
def test_parameter_default_outside_domain(tmp_path, default, domain):
    path = write_spec(tmp_path, params=f'delta = {{ default = {default}, domain = "{domain}" }}\n')
    error = spec_error(path)
    assert_names(error, path, "[params] delta.default")
    assert domain in str(error) and "outside the domain" in str(error)


@pytest.mark.parametrize("default", ['"1.0"', "true", "[1.0]"])
def test_parameter_default_not_a_number(tmp_path, default):
    path = write_spec(tmp_path, params=f'delta = {{ default = {default}, domain = "positive" }}\n')
    assert_names(spec_error(path), path, "[params] delta.default")


def test_missing_loss_and_missing_prediction(tmp_path):
    path = write_spec(tmp_path, loss=None)
    assert_names(spec_error(path), path, "loss")
    path = write_spec(tmp_path, inputs='y = { role = "target" }\np = { role = "target" }\n')
    error = spec_error(path)
    assert_names(error, path, "[inputs]")
    assert "prediction" in str(error)


def test_expression_not_a_string(tmp_path):
    path = write_spec(tmp_path, loss="expr = 3\n")
    assert_names(spec_error(path), path, "[loss] expr")


def test_file_name_must_match_name(tmp_path):
    path = write_spec(tmp_path, name="test_loss", file_name="other_name")
    error = spec_error(path)
    assert_names(error, path, "name")
    assert "other_name.toml" in str(error) and "'test_loss'" in str(error)


# --- names ---------------------------------------------------------------------------------

def _spec_with_name(tmp_path, table, bad):
    if table == "inputs":
        return write_spec(tmp_path, inputs=f'y = {{ role = "target" }}\n{bad} = {{ role = "prediction" }}\n',
                          let=None, params=None, expr=f"({bad} - y)**2")
    if table == "params":
        return write_spec(tmp_path, params=f'{bad} = {{ default = 1.0 }}\n', let=None, expr="(p - y)**2")
    return write_spec(tmp_path, params=None, let=f'{bad} = "p - y"\n', expr="(p - y)**2")


@pytest.mark.parametrize("table", ["inputs", "params", "let"])
@pytest.mark.parametrize("bad", ["lambda", "if", "None"])
def test_python_keyword_names_rejected(tmp_path, table, bad):
    path = _spec_with_name(tmp_path, table, bad)
    error = spec_error(path)
    assert_names(error, path, f"[{table}] {bad}")
    assert "keyword" in str(error)


@pytest.mark.parametrize("table", ["inputs", "params", "let"])
@pytest.mark.parametrize("bad, why", [
    ("np", "shadow"),
    ("reduction", "shadow"),
    ("sample_weight", "shadow"),
    ("numba", "shadow"),
    ("_r", "underscore"),
    ("exp", "function"),
    ("pi", "constant"),
    ("len", "builtin"),
])
def test_names_shadowing_generated_identifiers_rejected(tmp_path, table, bad, why):
    path = _spec_with_name(tmp_path, table, bad)
    error = spec_error(path)
    assert_names(error, path, f"[{table}] {bad}")
    assert why in str(error) and "choose another name" in str(error)


def test_loss_name_keyword_rejected(tmp_path):
    path = write_spec(tmp_path, name="lambda")
    error = spec_error(path)
    assert_names(error, path, "name")
    assert "keyword" in str(error)


def test_param_redeclaring_input_rejected(tmp_path):
    path = write_spec(tmp_path, params='p = { default = 1.0 }\n')
    assert_names(spec_error(path), path, "[params] p")


def test_duplicate_loss_name_across_files(tmp_path):
    first = write_spec(tmp_path, family="a", let=None, params=None, expr="(p - y)**2")
    second = write_spec(tmp_path, family="b", let=None, params=None, expr="Abs(p - y)")
    with pytest.raises(SpecError) as info:
        load_specs(tmp_path)
    assert_names(info.value, second, "name")
    assert "duplicate loss name 'test_loss'" in str(info.value)
    assert str(first) in str(info.value)

    lines = []
    files, errors = render_all(tmp_path, log=lines.append)
    assert len(errors) == 1
    assert str(second) in errors[0] and "name" in errors[0]
    assert "duplicate loss name 'test_loss'" in errors[0] and str(first) in errors[0]
    assert any("b/test_loss.toml" in line and "FAILED" in line for line in lines)


# --- expression errors ---------------------------------------------------------------------

def test_unknown_function_suggests_and_points_at_it(tmp_path):
    expr = "exp(p) + expp(p - y)"
    path = write_spec(tmp_path, params=None, let=None, expr=expr)
    error = spec_error(path)
    assert_names(error, path, "[loss] expr", column_of(expr, "expp"))
    assert "unknown function 'expp'" in str(error) and "did you mean 'exp'" in str(error)


def test_undeclared_name_points_at_it(tmp_path):
    expr = "(p - yy)**2 + delta"
    path = write_spec(tmp_path, let=None, expr=expr)
    error = spec_error(path)
    assert_names(error, path, "[loss] expr", column_of(expr, "yy"))
    assert "undeclared name 'yy'" in str(error) and "did you mean 'y'" in str(error)


def test_undeclared_name_in_let(tmp_path):
    text = "p - q"
    path = write_spec(tmp_path, let=f"r = {toml_string(text)}\n")
    error = spec_error(path)
    assert_names(error, path, "[let] r", column_of(text, "q"))


def test_column_counts_leading_whitespace(tmp_path):
    expr = "   (p - y)**2 + q"
    path = write_spec(tmp_path, params=None, let=None, expr=expr)
    assert_names(spec_error(path), path, "[loss] expr", column_of(expr, "q"))


def test_piecewise_without_otherwise_branch(tmp_path):
    expr = "Piecewise((r**2/2, Abs(r) < delta), (delta*Abs(r), Abs(r) >= delta))"
    path = write_spec(tmp_path, expr=expr)
    error = spec_error(path)
    assert_names(error, path, "[loss] expr", column_of(expr, "(delta*Abs(r)"))
    assert "(expr, True)" in str(error)


@pytest.mark.parametrize("expr", ["y**2 + delta", "p - p + y**2"])
def test_loss_must_depend_on_prediction(tmp_path, expr):
    path = write_spec(tmp_path, let=None, expr=expr)
    error = spec_error(path)
    assert_names(error, path, "[loss] expr")
    assert "does not depend on the prediction 'p'" in str(error)


def test_loss_and_let_must_not_be_conditions(tmp_path):
    path = write_spec(tmp_path, params=None, let=None, expr="p > y")
    assert_names(spec_error(path), path, "[loss] expr")
    path = write_spec(tmp_path, params=None, let='c = "p > y"\n', expr="(p - y)**2")
    assert_names(spec_error(path), path, "[let] c")


def test_syntax_error_in_expression(tmp_path):
    expr = "(p - y)**2 +"
    path = write_spec(tmp_path, params=None, let=None, expr=expr)
    error = spec_error(path)
    assert_names(error, path, "[loss] expr")
    assert "syntax error" in str(error)


# Expressions that SymPy or Python's parser would choke on: each is a SpecError naming the
# file and field, never a KeyError/TypeError/RecursionError from deep inside.
@pytest.mark.parametrize("expr, fragment", [
    ("(p - y)**2 + (p is y)", "p is y"),
    ("(p - y)**2 + (p in y)", "p in y"),
    ("(p - y)**2 + p**(p > y)", "p**(p > y)"),
    ("(p - y)**2 + Max(p > y, 1)", "Max(p > y, 1)"),
    ("(p - y)**2 + -(p > y)", "-(p > y)"),
    ("(p - y)**2 + (p + True)", "p + True"),
    ("(p - y)**2 + p/0", "p/0"),
    ("(p - y)**2 + log(0)*p", "log(0)"),
    ("(p - y)**2 + p @ y", None),
    ("(p - y)**2 + p % y", None),
    ("Piecewise((p, (p > 0) & (y > 0)), (y, True))", None),  # & is a bitwise operator: refused
    ("(p - y)**2 + 1e999*p", "1e999"),
    ("(p - y)**2 + 'text'", "'text'"),
    ("(p - y)**2 + exp(x=p)", "exp(x=p)"),
    ("(p - y)**2 + exp(p, y)", "exp(p, y)"),
    ("(p - y)**2 + (p, y)", None),
    ("-" * 20000 + "p", None),
    ("p" + " + p" * 3000, None),
])
def test_malformed_expressions_are_spec_errors(tmp_path, expr, fragment):
    path = write_spec(tmp_path, params=None, let=None, expr=expr)
    error = spec_error(path)
    assert_names(error, path, "[loss] expr", column_of(expr, fragment) if fragment else None)


def test_huge_exact_power_is_refused_quickly(tmp_path):
    """'9**9**9' would make SymPy compute a number of 10**9 bits: refuse it, don't hang."""
    expr = "(p - y)**2 + 9**9**9"
    path = write_spec(tmp_path, params=None, let=None, expr=expr)
    code = textwrap.dedent(f"""
        from lossgen.spec import SpecError, load_spec
        try:
            load_spec({str(path)!r})
        except SpecError as error:
            print("column", error.column, error)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"column {column_of(expr, '9**9**9')} ")
    assert str(path) in result.stdout and "too large" in result.stdout


# --- security: a spec is data, never executed ----------------------------------------------

MALICIOUS = [
    "__import__('os').system('touch PWNED')",
    "p.__class__",
    "(lambda: 1)()",
    "[1,2][0]",
    "p if y else y",
    "().__class__.__bases__[0].__subclasses__()",
    "exp.__globals__",
    "p(1)",
    "f'{p}'",
    "[x for x in (p, y)]",
    "{'a': p}",
    "(q := p)",
    "__import__",
    "open('PWNED', 'w')",
    "eval('p')",
    "getattr(p, 'func')",
    "*p",
]


class Executed(BaseException):
    """Raised by the guards below; a BaseException so that no `except Exception` can hide it."""


@pytest.fixture
def no_execution(monkeypatch, tmp_path):
    """Fail loudly if anything evaluates text: eval, exec, or SymPy's string parser."""
    def guard(*args, **kwargs):
        raise Executed(f"evaluated: {args!r}")

    monkeypatch.setattr(builtins, "eval", guard)
    monkeypatch.setattr(builtins, "exec", guard)
    monkeypatch.setattr(sp, "sympify", guard)
    monkeypatch.setattr("sympy.parsing.sympy_parser.parse_expr", guard)
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("expr", MALICIOUS)
def test_malicious_expressions_raise_spec_error(tmp_path, no_execution, expr):
    path = write_spec(tmp_path, params=None, let=None, expr=f"(p - y)**2 + {expr}")
    error = spec_error(path)
    assert_names(error, path, "[loss] expr")
    assert error.column is not None


@pytest.mark.parametrize("expr", MALICIOUS[:5])
def test_malicious_let_raises_spec_error(tmp_path, no_execution, expr):
    path = write_spec(tmp_path, params=None, let=f"r = {toml_string(expr)}\n", expr="(p - y)**2")
    assert_names(spec_error(path), path, "[let] r")


def test_valid_spec_loads_without_any_evaluation(tmp_path, no_execution):
    """The guards do not get in the way of a valid spec: parsing never needed eval/sympify."""
    spec = load_spec(write_spec(tmp_path))
    assert spec.loss.has(sp.Piecewise)


def test_column_of_attribute_access(tmp_path):
    expr = "(p - y)**2 + 2*p.__class__"
    path = write_spec(tmp_path, params=None, let=None, expr=expr)
    assert_names(spec_error(path), path, "[loss] expr", column_of(expr, "p.__class__"))


@pytest.mark.parametrize("expr, fragment", [
    ("Piecewise((p, p and y), (y, True))", "p and y"),
    ("Piecewise((p, not p), (y, True))", "p), (y"),
    ("Piecewise((p, (p > y) or y), (y, True))", "y), (y"),
])
def test_logic_needs_conditions_not_numbers(tmp_path, expr, fragment):
    path = write_spec(tmp_path, expr=expr)
    error = spec_error(path)
    assert "expected a condition" in str(error)
    assert_names(error, path, "[loss] expr", column_of(expr, fragment))


def test_logic_of_conditions_is_accepted(tmp_path):
    spec = load_spec(write_spec(tmp_path, expr="Piecewise((p, (p > y) and not (p > 2*y)), (y, True))"))
    p, y = spec.symbols["p"], spec.symbols["y"]
    assert spec.loss == sp.Piecewise((p, sp.And(p > y, p <= 2 * y)), (y, True))


def test_constant_beyond_float64_range_is_refused(tmp_path):
    error = spec_error(write_spec(tmp_path, expr="p*(1e308*10)"))
    assert "float64 range" in str(error)


def test_loss_that_is_a_plain_prediction_is_a_number(tmp_path):
    spec = load_spec(write_spec(tmp_path, expr="p", let=None))
    assert spec.loss == spec.symbols["p"]


# --- kernels specialised at defaults (key `specialise`) ------------------------------------

ROW_SPEC_INPUTS = ('y = { role = "target", domain = "class_index" }\n'
                   's = { role = "prediction", axis = "class" }\n'
                   'w = { role = "input", axis = "class", shared = true, default = 1.0, specialise = true }\n')


@pytest.mark.parametrize("value", ['"yes"', "1", "0", "[true]"])
def test_specialise_must_be_a_bool(tmp_path, value):
    path = write_spec(tmp_path, params=f'delta = {{ default = 2.0, domain = "positive", specialise = {value} }}\n')
    error = spec_error(path)
    assert_names(error, path, "[params] delta.specialise")
    assert "expected true or false" in str(error)
    path = write_spec(tmp_path, inputs='y = { role = "target", specialise = 1 }\np = { role = "prediction" }\n')
    assert_names(spec_error(path), path, "[inputs] y.specialise")


def test_only_a_shared_input_with_a_default_is_specialised(tmp_path):
    path = write_spec(tmp_path, inputs='y = { role = "target", specialise = true }\np = { role = "prediction" }\n')
    error = spec_error(path)
    assert_names(error, path, "[inputs] y.specialise")
    assert "shared input with a default" in str(error)


def test_at_defaults_puts_the_defaults_in_and_drops_the_names(tmp_path):
    path = write_spec(tmp_path, inputs=ROW_SPEC_INPUTS, let=None,
                      params='a = { default = 0.0, domain = "unit_interval", specialise = true }\n'
                             'b = { default = 0.5, domain = "positive" }\n',
                      expr="-(1 - a)*take(w*log_softmax(s), y) - a*mean(w*log_softmax(s)) + b*sum(s)")
    spec = load_spec(path)
    assert spec.specialised_names == ("w", "a") and spec.specialised_module == "_test_loss_defaults"
    plain = spec.at_defaults()
    assert [i.name for i in plain.inputs] == ["y", "s"] and [p.name for p in plain.params] == ["b"]
    assert plain.specialised_module is None and set(plain.symbols) == {"y", "s", "b"}
    assert plain.loss.free_symbols == {plain.symbols["y"], plain.symbols["s"], plain.symbols["b"]}
    assert "specialised at w = 1, a = 0" in plain.title
    unmarked = write_spec(tmp_path, name="plain_loss")
    assert load_spec(unmarked).specialised_module is None


def test_a_specialised_spec_generates_two_modules(tmp_path):
    path = write_spec(tmp_path, params='delta = { default = 2.0, domain = "positive", specialise = true }\n')
    files, errors = render_all(path.parent.parent, log=lambda line: None)
    assert not errors and set(files) == {"__init__.py", "test_loss.py", "_test_loss_defaults.py"}
    assert "\"specialised\": ('_test_loss_defaults', ('delta',))" in files["test_loss.py"]
    assert '"params": (),' in files["_test_loss_defaults.py"]
    assert "def loss_scalar(y, p):" in files["_test_loss_defaults.py"]
    assert "_test_loss_defaults" not in files["__init__.py"]
