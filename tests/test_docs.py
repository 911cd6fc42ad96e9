"""The formula reference (`lossgen docs`): a fragment per loss with its formulas and plot, LaTeX
escaping of user text, byte-for-byte determinism, and the proof that the typeset derivatives
are the ones the kernels compute."""
from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

import lossgen

from conftest import CATALOG_NAMES, CATALOG_PATHS, derivation_of
from lossgen.derive import kink_expressions
from lossgen.docs import FRAGMENTS, PDF, REFERENCE, compile_pdf, docs, pdf_hash, render_docs, sources_hash
from lossgen.emit_latex import (LINE_UNITS, MARKER, Typesetter, latex, latex_escape, plot_setup, render_reference,
                                render_section, tex_width, typeset)
from lossgen.paths import GENERATED_DIR, SPECS_DIR
from lossgen.spec import SpecError, spec_from_dict
from lossgen.verify import mp_function

REPO = Path(__file__).resolve().parents[1]
SPECIALS = "100% a_b & c #1 $5 C:\\path"  # the characters LaTeX would misread, in user text


def quiet(message):
    pass


@functools.lru_cache(maxsize=None)
def fragment(name: str) -> str:
    """The fragment of a catalog loss, rendered in memory as `lossgen docs` does (plots from the
    kernels in generated/), from the derivation the other tests use (conftest)."""
    derivation = derivation_of(name)
    loss = lossgen.get(name) if plot_setup(derivation.spec)[0] else None
    return render_section(derivation, f"specs/{CATALOG_PATHS[name].relative_to(SPECS_DIR).as_posix()}", loss)


def run_cli(*args, cwd, env=None):
    result = subprocess.run([sys.executable, "-m", "lossgen", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


# --- escaping of user text ------------------------------------------------------------------------

def test_escape_makes_every_special_character_literal():
    assert latex_escape(SPECIALS) == r"100\% a\_b \& c \#1 \$5 C:\textbackslash{}path"
    assert latex_escape("{x} ^ ~ < > | \"") == (r"\{x\} \textasciicircum{} \textasciitilde{} \textless{} "
                                                r"\textgreater{} \textbar{} \textquotedbl{}")
    assert latex_escape("plain text, 1.5 (a-b)") == "plain text, 1.5 (a-b)"


def test_escape_unicode_and_line_breaks():
    assert latex_escape("Traité α ≤ β – x") == r"Traité \ensuremath{\alpha} \ensuremath{\leq} \ensuremath{\beta} -- x"
    assert latex_escape("emoji \U0001F600") == "emoji [U+1F600]"
    # a long identifier may break after . and _ (never before a space, never at the start)
    assert latex_escape("torch.nn.l1_loss. End", breaks=True) == \
        r"torch.\allowbreak{}nn.\allowbreak{}l1\_\allowbreak{}loss. End"
    assert latex_escape("torch.nn.l1_loss. End") == r"torch.nn.l1\_loss. End"


def test_spec_text_is_escaped_in_the_fragment(tmp_path):
    spec = spec_from_dict({
        "name": "odd", "title": f"Title {SPECIALS}", "summary": f"Summary {SPECIALS}",
        "references": [f"Reference {SPECIALS}"], "special_cases": [f"Case {SPECIALS}"], "notes": f"Note {SPECIALS}",
        "inputs": {"y": {"role": "target", "doc": f"doc {SPECIALS}"}, "p": {"role": "prediction"}},
        "params": {"k": {"default": 1.0, "domain": "positive", "doc": f"param {SPECIALS}"}},
        "loss": {"expr": "k*(p - y)**2"}}, tmp_path / "custom" / "odd.toml")
    from lossgen.derive import derive

    text = render_section(derive(spec), "specs/custom/odd.toml")
    for prefix in ("Title", "Summary", "Reference", "Case", "Note", "doc", "param"):
        assert latex_escape(f"{prefix} {SPECIALS}", breaks=prefix != "Title") in text
    assert SPECIALS not in text  # never unescaped
    assert "(No plot: no kernels given.)" in text


def test_special_cases_key_is_a_list_of_strings(tmp_path):
    base = {"name": "x", "inputs": {"p": {"role": "prediction"}}, "loss": {"expr": "p**2"}}
    assert spec_from_dict({**base, "special_cases": ["a", "b"]}, tmp_path / "f" / "x.toml").special_cases == ("a", "b")
    assert spec_from_dict(base, tmp_path / "f" / "x.toml").special_cases == ()
    for bad in ("one string", [1], [""], {"a": 1}):
        with pytest.raises(SpecError, match="special_cases"):
            spec_from_dict({**base, "special_cases": bad}, tmp_path / "f" / "x.toml")


# --- the printer and the layout ----------------------------------------------------------------------

def test_printer_vocabulary_and_names():
    from sympy.codegen.cfunctions import expm1, hypot, log1p

    from lossgen.vocabulary import logcosh, sigmoid, softplus

    x, y = sp.symbols("x y", real=True)
    scale, lam, delta = sp.Symbol("my_scale", positive=True), sp.Symbol("lambda1"), sp.Symbol("delta")
    assert latex(sigmoid(x)) == r"\sigma(x)"
    assert latex(softplus(x)) == r"\operatorname{softplus}(x)"
    assert latex(logcosh(x)) == r"\log\cosh(x)"
    assert latex(log1p(x)) == r"\log(x + 1)"
    assert latex(expm1(x)) == r"\left(e^{x} - 1\right)"
    assert latex(hypot(x, y)) == r"\sqrt{x^{2} + y^{2}}"
    assert latex(sp.Heaviside(x)) == "H(x)"
    assert latex(sp.sign(x)) == r"\operatorname{sign}(x)"
    assert latex(scale) == r"\mathit{my\_scale}" and latex(lam) == r"\lambda_{1}"
    assert latex(delta * scale) == r"\delta \, \mathit{my\_scale}"
    assert latex(-delta / 2 + sp.Abs(x)) == r"\left|{x}\right| - \frac{\delta}{2}"  # a positive term first
    assert latex(delta > sp.Abs(x), variables={x}) == r"\left|{x}\right| < \delta"


def _long_spec(tmp_path):
    return spec_from_dict({
        "name": "focal", "inputs": {"y": {"role": "target", "domain": "label01"}, "s": {"role": "prediction"}},
        "params": {"gamma": {"default": 2.0, "domain": "nonnegative"}, "alpha": {"default": 0.25, "domain": "unit_interval"}},
        "let": {"q": "sigmoid(s)"},
        "loss": {"expr": "-alpha*y*(1 - q)**gamma*log(q) - (1 - alpha)*(1 - y)*q**gamma*log(1 - q)"}},
        tmp_path / "c" / "focal.toml")


def test_long_formulas_are_named_and_broken_and_still_exact(tmp_path):
    from lossgen.derive import derive

    derivation = derive(_long_spec(tmp_path))
    layout = typeset(derivation)
    hess = layout["predictions"][0]["hess"]
    assert tex_width(latex(derivation.hess[0])) > 3 * LINE_UNITS  # far too long for a line as it is
    assert hess.where, "the Hessian should be written with named subexpressions"
    for formula in [layout["loss"], layout["predictions"][0]["grad"], hess]:
        assert formula.exact
        lines = list(formula.lines) + [line for d in formula.where for line in d.lines]
        assert all(tex_width(line) <= LINE_UNITS for line in lines), lines
    names = [str(s) for s, _ in hess.names]
    assert names == [f"u_{k}" for k in range(1, len(names) + 1)]  # numbered in reading order


def test_let_names_are_used_only_where_exact():
    derivation = derivation_of("huber")
    setter = Typesetter(derivation)
    r = sp.Symbol("r")
    shown = setter.with_lets(derivation.loss)
    assert r in shown.free_symbols and not shown.has(derivation.spec.symbols["p"])
    assert setter.expand_lets(shown) == derivation.loss


# --- every loss of the catalog ---------------------------------------------------------------------

@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_every_loss_has_a_fragment_with_formulas_and_plot(name):
    text = fragment(name)
    spec = derivation_of(name).spec
    assert text.startswith(f"% {MARKER} ")
    assert rf"\lossgensection{{{latex_escape(spec.title)}}}{{loss:{name}}}" in text
    assert "\n\\ell &= " in text
    for prediction in spec.predictions:
        p = latex(spec.symbols[prediction.name])
        assert rf"\frac{{\partial \ell}}{{\partial {p}}} &= " in text
        assert rf"\frac{{\partial^{{2}} \ell}}{{\partial {p}^{{2}}}} &= " in text
    # every loss is plotted, against its first prediction (any others held at a typical value)
    for quantity in ("loss", "grad", "hess"):
        assert f"% curve {quantity}" in text
    assert text.count(r"\addplot coordinates") in (3, 6, 9)
    if kink_expressions(derivation_of(name)):
        assert r"\lossgenpart{At kinks}" in text
    for case in spec.special_cases:
        assert latex_escape(case, breaks=True) in text


def test_reference_has_title_page_contents_and_families():
    entries = [(n, derivation_of(n).spec.family, derivation_of(n).spec.title) for n in CATALOG_NAMES]
    reference = render_reference(entries, lossgen.__version__)
    assert reference.startswith(f"% {MARKER}")
    assert r"\begin{titlepage}" in reference and r"\tableofcontents" in reference
    families = sorted({family for _, family, _ in entries})
    positions = [reference.index(rf"\section{{{f.upper() if len(f) <= 3 else f.capitalize()}}}") for f in families]
    assert positions == sorted(positions)
    for name in CATALOG_NAMES:
        assert rf"\input{{losses/{name}}}" in reference


# --- the typeset derivatives are the kernels' derivatives -------------------------------------------------

def _rows(formula) -> list[str]:
    """How the fragment writes a formula: lhs &= first line, continuation lines, definitions."""
    rows = [f"{formula.lhs} &= {formula.lines[0]}"] + [rf"\\ &\quad {line}" for line in formula.lines[1:]]
    for definition in formula.where:
        rows.append(f"{definition.tex} &= {definition.lines[0]}")
        rows += [rf"\\ &\quad {line}" for line in definition.lines[1:]]
    return rows


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_typeset_gradient_is_the_kernels_derivative(name):
    """The kernel module and the fragment come from the same expression objects.

    derivation.grad[k] is what the generated module was built from (its docstring holds
    sp.sstr of it, and tests/test_catalog.py checks the kernel against it at 50 digits); the
    fragment shows that very object, printed by the LaTeX emitter, and the typeset form
    (let names, u_k) substitutes back to exactly that expression.
    """
    derivation = derivation_of(name)
    module = (GENERATED_DIR / f"{name}.py").read_text(encoding="utf-8")
    text = fragment(name)
    layout = typeset(derivation)
    assert layout["loss"].expr is derivation.loss
    assert f"    loss = {sp.sstr(derivation.loss)}" in module
    formulas = [layout["loss"]]
    for k, prediction in enumerate(derivation.spec.predictions):
        grad, hess = layout["predictions"][k]["grad"], layout["predictions"][k]["hess"]
        assert grad.expr is derivation.grad[k] and hess.expr is derivation.hess[k]
        assert f"d loss / d {prediction.name} = {sp.sstr(derivation.grad[k])}" in module
        assert f"d2 loss / d {prediction.name}2 = {sp.sstr(derivation.hess[k])}" in module
        formulas += [grad, hess]
    for formula in formulas:
        assert formula.exact, f"{name}: {formula.lhs} does not reassemble to the derivation's expression"
        for row in _rows(formula):
            assert row in text, row
        if formula.shown == formula.expr:  # nothing renamed: the printer's text of the very object
            assert latex(formula.expr, Typesetter(derivation).variables) == formula.lines[0] or len(formula.lines) > 1


_CURVE = re.compile(r"^% curve (loss|grad|hess)(?: (\w+)=(\S+))?\n\\addplot coordinates \{\n(.*?)\n\};", re.M | re.S)


def plotted_curves(fragment: str) -> dict:
    """{(parameter value or None): {"x": [...], "loss": [...], "grad": [...], "hess": [...]}}."""
    curves: dict = {}
    for quantity, _, value, body in _CURVE.findall(fragment):
        pairs = re.findall(r"\(([^,()]+),([^,()]+)\)", body)
        curve = curves.setdefault(value or None, {})
        curve["x"] = [float(x) for x, _ in pairs]
        curve[quantity] = [float(y) for _, y in pairs]
    return curves


def derivative_mismatches(xs, f, df, near_kink) -> tuple[list[int], int, int]:
    """Points where df is not the central difference of f: (bad indices, checked, strictly close).

    A point is checked unless its stencil holds nan or straddles a kink (a kink expression
    changes sign or vanishes there); it passes when |fd - df| is within a small tolerance plus
    the range of df over the stencil (a curve that bends faster than the plot resolves, such
    as charbonnier's Hessian near 0), and passes strictly without that allowance.
    """
    bad, checked, strict = [], 0, 0
    for i in range(1, len(xs) - 1):
        stencil = [f[i - 1], f[i + 1], df[i - 1], df[i], df[i + 1]]
        if not all(math.isfinite(v) for v in stencil) or near_kink(xs[i - 1], xs[i + 1]):
            continue
        checked += 1
        fd = (f[i + 1] - f[i - 1]) / (xs[i + 1] - xs[i - 1])
        rounding = 2e-6 * max(abs(f[i - 1]), abs(f[i + 1])) / (xs[i + 1] - xs[i - 1])  # '%.6g'
        tolerance = 2e-3 * (1 + abs(df[i])) + rounding
        error = abs(fd - df[i])
        strict += error <= tolerance
        if error > tolerance + max(df[i - 1:i + 2]) - min(df[i - 1:i + 2]):
            bad.append(i)
    return bad, checked, strict


def kink_test(name, value):
    """near_kink(a, b): does a kink of the loss lie in [a, b] for this curve's parameters?"""
    derivation = derivation_of(name)
    spec = derivation.spec
    setup, _ = plot_setup(spec)
    values = {spec.symbols[n]: v for n, v in setup.fixed}
    for param in spec.params:
        values[spec.symbols[param.name]] = float(value) if param.name == setup.param and value else param.default
    x = spec.symbols[setup.prediction]
    functions = [mp_function(k.xreplace(values), [x]) for k in kink_expressions(derivation)]

    def near_kink(a, b):
        for function in functions:
            ends = [function(a), function((a + b) / 2), function(b)]
            if any(v == 0 for v in ends) or len({v > 0 for v in ends}) > 1:
                return True
        return False

    return near_kink


@pytest.mark.parametrize("name", CATALOG_NAMES)
def test_plotted_derivatives_are_derivatives_of_the_plotted_loss(name):
    """Independent of the symbolic side: the plotted gradient is the central difference of the
    plotted loss, and the plotted Hessian that of the plotted gradient (all from the kernels)."""
    curves = plotted_curves(fragment(name))
    if not curves:
        assert plot_setup(derivation_of(name).spec)[0] is None
        return
    for value, curve in curves.items():
        near_kink = kink_test(name, value)
        for f, df in (("loss", "grad"), ("grad", "hess")):
            bad, checked, strict = derivative_mismatches(curve["x"], curve[f], curve[df], near_kink)
            assert not bad, f"{name} ({value}): d {f} != {df} at x = {[curve['x'][i] for i in bad]}"
            # most points are checked, and most pass without the allowance: the test has teeth
            assert checked >= 0.3 * len(curve["x"]) and strict >= 0.6 * checked, (name, value, f, checked, strict)


def test_the_finite_difference_check_can_fail():
    curve = plotted_curves(fragment("huber"))["1.0"]
    near_kink = kink_test("huber", "1.0")
    assert not derivative_mismatches(curve["x"], curve["loss"], curve["grad"], near_kink)[0]
    doubled = [2 * g for g in curve["grad"]]
    assert derivative_mismatches(curve["x"], curve["loss"], doubled, near_kink)[0]
    assert derivative_mismatches(curve["x"], curve["grad"], [0.0] * len(curve["x"]), near_kink)[0]
    assert derivative_mismatches(curve["x"], curve["loss"], curve["hess"], near_kink)[0]


def test_kink_table_shows_the_conventions():
    mae, huber, quantile = (fragment(n) for n in ("mae", "huber", "quantile"))
    # sign(0) = 0: the L1 gradient is 0 at p = y; Huber is linear at |r| = delta (first branch fails)
    assert r"$p - y = 0$ & $p = 0$ & $0$ & $0$ & $0$ \\" in mae
    assert r"$\left|{r}\right| = \delta$ & $p = 1$ & $0.5$ & $1$ & $0$ \\" in huber
    # Heaviside(0) = 1/2: the pinball gradient is 1/2 - tau = 0 at p = y for tau = 1/2
    assert re.search(r"& \$p = 0\$ & \$0\$ & \$0\$ & \$0\$", quantile)


# --- the claims of the specs' special cases ---------------------------------------------------------

def _loss(name, **values):
    spec = derivation_of(name).spec
    return spec.loss.xreplace({spec.symbols[k]: sp.sympify(v) for k, v in values.items()})


@pytest.mark.parametrize("claim", [
    ("smooth_l1(beta=0) = mae", lambda y, p: (_loss("smooth_l1", y=y, p=p, beta=0), _loss("mae", y=y, p=p))),
    ("huber(delta) = delta smooth_l1(beta=delta)",
     lambda y, p: (_loss("huber", y=y, p=p, delta=1.5), 1.5 * _loss("smooth_l1", y=y, p=p, beta=1.5))),
    ("quantile(tau=1/2) = mae/2", lambda y, p: (_loss("quantile", y=y, p=p, tau=sp.Rational(1, 2)), _loss("mae", y=y, p=p) / 2)),
    ("elastic_net(lambda2=0) = l1_penalty",
     lambda y, p: (_loss("elastic_net", w=p, lambda1=0.7, lambda2=0), _loss("l1_penalty", w=p, lambda1=0.7))),
    ("elastic_net(lambda1=0) = l2_penalty",
     lambda y, p: (_loss("elastic_net", w=p, lambda1=0, lambda2=0.7), _loss("l2_penalty", w=p, lambda2=0.7))),
    ("pseudo_huber(delta) = delta (charbonnier(epsilon=delta) - delta)",
     lambda y, p: (_loss("pseudo_huber", y=y, p=p, delta=1.5), 1.5 * (_loss("charbonnier", y=y, p=p, epsilon=1.5) - 1.5))),
    ("cauchy(y, p) = cauchy_rho(s = (p - y)^2)",
     lambda y, p: (_loss("cauchy", y=y, p=p, delta=1.5), _loss("cauchy_rho", s=(p - y) ** 2, delta=1.5))),
    ("msle(y, p) = mse(log(1 + y), log(1 + p))",
     lambda y, p: (_loss("msle", y=abs(y), p=abs(p)), _loss("mse", y=sp.log(1 + abs(y)), p=sp.log(1 + abs(p))))),
], ids=lambda claim: claim[0])
def test_special_cases_stated_in_the_specs_hold(claim):
    _, sides = claim
    for y, p in [(0.3, -1.7), (2.0, 2.25), (-0.4, -0.45), (1.0, 1.0), (5.0, -3.0)]:
        left, right = sides(sp.Float(y), sp.Float(p))
        assert abs(float(left) - float(right)) <= 1e-12 * (1 + abs(float(right))), (claim[0], y, p)


# --- the command: files, staleness, determinism, the PDF ---------------------------------------------

def _some_specs(folder: Path, names) -> Path:
    for name in names:
        source = CATALOG_PATHS[name]
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return folder


def _longest_hessians(count):
    return sorted(CATALOG_NAMES, key=lambda n: -sp.count_ops(derivation_of(n).hess[0]))[:count]


def test_docs_writes_checks_and_leaves_foreign_files_alone(tmp_path):
    specs = _some_specs(tmp_path / "specs", ["huber", "mae"])
    out = tmp_path / "docs"
    (out / FRAGMENTS).mkdir(parents=True)
    (out / FRAGMENTS / "mine.tex").write_text("% my own notes\n")
    (out / FRAGMENTS / "gone.tex").write_text(f"% {MARKER} from a spec that was removed\n")
    messages = []
    assert docs(specs, GENERATED_DIR, out, log=messages.append) == 0
    assert (out / FRAGMENTS / "mine.tex").read_text() == "% my own notes\n"
    assert not (out / FRAGMENTS / "gone.tex").exists()
    assert sorted(p.name for p in (out / FRAGMENTS).iterdir()) == ["huber.tex", "mae.tex", "mine.tex"]
    # --check: the PDF is missing; a PDF built from these sources makes it pass; an edit makes it stale
    assert docs(specs, GENERATED_DIR, out, check=True, log=messages.append) == 1
    files, _ = render_docs(specs, GENERATED_DIR, log=quiet)
    (out / PDF).write_bytes(b"%PDF-1.5 /LossgenSources (sha256=" + sources_hash(files).encode() + b")\n")
    assert pdf_hash(out / PDF) == sources_hash(files)
    assert docs(specs, GENERATED_DIR, out, check=True, log=messages.append) == 0
    (out / FRAGMENTS / "mae.tex").write_text((out / FRAGMENTS / "mae.tex").read_text() + "%\n")
    messages.clear()
    assert docs(specs, GENERATED_DIR, out, check=True, log=messages.append) == 1
    assert any("mae.tex differs" in m for m in messages)


def test_docs_refuses_stale_kernels(tmp_path):
    specs = _some_specs(tmp_path / "specs", ["mae"])
    path = specs / "regression" / "mae.toml"
    path.write_text(path.read_text() + "\n# edited\n")
    messages = []
    assert docs(specs, GENERATED_DIR, tmp_path / "docs", log=messages.append) == 1
    assert any("stale" in m and "lossgen generate" in m for m in messages)
    assert not (tmp_path / "docs").exists()


def test_docs_output_is_deterministic_across_hash_seeds(tmp_path):
    """`lossgen docs` in two processes with different hash seeds writes the same bytes, and the
    same fragments as rendered in this process."""
    names = sorted({"huber", "quantile", *_longest_hessians(1)})
    specs = _some_specs(tmp_path / "specs", names)
    processes = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        command = [sys.executable, "-m", "lossgen", "docs", "--specs", str(specs), "--kernels", str(GENERATED_DIR),
                   "--out", str(tmp_path / f"out{seed}")]
        processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    first, second = (sorted(p.relative_to(tmp_path / f"out{s}") for p in (tmp_path / f"out{s}").rglob("*.tex"))
                     for s in ("0", "4242"))
    assert first == second and len(first) >= 3
    for relative in first:
        assert (tmp_path / "out0" / relative).read_bytes() == (tmp_path / "out4242" / relative).read_bytes(), relative
    for name in names:
        assert (tmp_path / "out0" / FRAGMENTS / f"{name}.tex").read_text(encoding="utf-8") == fragment(name)


def test_pdf_without_tex_names_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    messages = []
    assert compile_pdf({REFERENCE: "\\documentclass{article}"}, None, log=messages.append) == 3
    text = "\n".join(messages)
    for needed in ("apt-get install", "texlive-latex-base", "texlive-pictures", "lmodern", "latexmk",
                   "tlmgr", "MiKTeX"):
        assert needed in text


def test_cli_docs_help_lists_the_options():
    rc, output = run_cli("docs", "--help", cwd=REPO)
    assert rc == 0
    for option in ("--out", "--specs", "--kernels", "--pdf", "--check"):
        assert option in output


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_spec_with_special_characters_compiles_and_shows_them(tmp_path):
    """A spec whose text holds % _ & # $ \\ compiles, and the PDF shows those characters."""
    specs = tmp_path / "specs" / "custom"
    specs.mkdir(parents=True)
    title = f"Odd {SPECIALS}"
    (specs / "odd_chars.toml").write_text(
        'name = "odd_chars"\n'
        f"title = '''{title}'''\n"
        f"summary = '''Summary: {SPECIALS} and a long torch.nn.functional.smooth_l1_loss_name_here.'''\n"
        f"references = ['''Ref {SPECIALS}''']\n"
        f"special_cases = ['''k = 1 is {SPECIALS}''']\n"
        '[inputs]\ny = { role = "target" }\np = { role = "prediction" }\n'
        '[params]\nk = { default = 1.0, domain = "positive", doc = "scale, 50% & more" }\n'
        '[loss]\nexpr = "k*log(cosh((p - y)/k))"\n', encoding="utf-8")
    rc, output = run_cli("generate", "--specs", "specs", "--out", "kernels", cwd=tmp_path)
    assert rc == 0, output
    rc, output = run_cli("docs", "--specs", "specs", "--kernels", "kernels", "--out", "docs", "--pdf", cwd=tmp_path)
    assert rc == 0, output
    assert "overflow" not in output
    pdf = tmp_path / "docs" / PDF
    assert pdf.read_bytes().startswith(b"%PDF")
    # the PDF records the sources it was built from: --check finds everything current
    rc, output = run_cli("docs", "--specs", "specs", "--kernels", "kernels", "--out", "docs", "--check", cwd=tmp_path)
    assert rc == 0, output
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True).stdout
        flat = " ".join(text.split())
        assert title in flat
        assert f"Ref {SPECIALS}" in flat and f"k = 1 is {SPECIALS}" in flat
    # the fragment alone, \input into LaTeX's plain article class with the documented preamble
    (tmp_path / "paper.tex").write_text(
        "\\documentclass{article}\n\\usepackage{mathtools,booktabs,tabularx,pgfplots}\n"
        "\\pgfplotsset{compat=1.16}\n\\begin{document}\n\\input{docs/losses/odd_chars}\n\\end{document}\n")
    for _ in range(2):  # twice: the plot's legend is a reference
        result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
                                cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout[-2000:]
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert "Overfull" not in log and "undefined" not in log.lower(), log[-2000:]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_pdf_fails_on_latex_errors_and_on_overflow():
    document = "\\documentclass{article}\\begin{document}\n%s\n\\end{document}\n"
    messages = []
    assert compile_pdf({REFERENCE: document % "fits"}, None, log=messages.append) == 0
    messages.clear()
    assert compile_pdf({REFERENCE: document % "$\\frac{1}{0$"}, None, log=messages.append) == 1
    assert any("failed" in m for m in messages)
    messages.clear()
    wide = "\\[" + " + ".join(f"x_{{{k}}}" for k in range(80)) + "\\]"
    assert compile_pdf({REFERENCE: document % wide}, None, log=messages.append) == 1
    assert any(m.startswith("overflow: ") for m in messages)
