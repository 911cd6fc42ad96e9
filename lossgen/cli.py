"""The ``lossgen`` command line: generate, list, show, new, verify, docs."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .paths import GENERATED_DIR, ROOT, SPECS_DIR

_DOCS_DIR = ROOT / "docs"  # where `lossgen docs` writes the reference


def _find_spec(specs_dir, name):
    from .spec import find_spec_files, load_spec

    for path in find_spec_files(specs_dir):
        if path.stem == name:
            return load_spec(path)
    raise SystemExit(f"error: no spec named '{name}' under {specs_dir}; `lossgen list` shows the catalog")


def cmd_generate(args) -> int:
    from .generate import generate

    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1, got {args.jobs}")
    return generate(args.specs, args.out, check=args.check, jobs=args.jobs)


def cmd_list(args) -> int:
    from .spec import SpecError, find_spec_files, load_spec

    status = 0
    for path in find_spec_files(args.specs):
        try:
            spec = load_spec(path)
            params = ", ".join(f"{p.name}={p.default:g}" for p in spec.params)
            print(f"{spec.family:<16} {spec.name:<22} {spec.title}" + (f"  [{params}]" if params else ""))
        except SpecError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 1
    return status


def cmd_show(args) -> int:
    import sympy as sp

    from .derive import derive

    spec = _find_spec(args.specs, args.name)
    derivation = derive(spec)
    print(f"{spec.title} ({spec.name}, {spec.family})")
    if spec.summary:
        print(spec.summary)
    print("\ninputs:  " + ", ".join(f"{i.name} ({i.role}, {i.domain})" for i in spec.inputs))
    if spec.params:
        print("params:  " + ", ".join(f"{p.name} = {p.default:g} ({p.domain})" for p in spec.params))
    for name, value in spec.lets:
        print(f"let:     {name} = {sp.sstr(value)}")

    def block(title, expr):
        print(f"\n{title}\n" + sp.pretty(expr, use_unicode=args.unicode, wrap_line=False))

    block("loss =", derivation.loss)
    for prediction, g, h in zip(spec.predictions, derivation.grad, derivation.hess):
        block(f"d loss / d {prediction.name} =", g)
        block(f"d2 loss / d {prediction.name}2 =", h)
    print("\nAt kinks: sign(0) = 0, Heaviside(0) = 1/2; a Piecewise boundary takes the first branch that holds.")
    for reference in spec.references:
        print(f"reference: {reference}")
    return 0


def cmd_new(args) -> int:
    from .emit import template_environment
    from .spec import SpecError, _check_identifier

    path = Path(args.specs) / args.family / f"{args.name}.toml"
    try:
        if not args.family.replace("-", "_").isidentifier():
            raise SpecError(path, "family", f"family {args.family!r} must be a plain folder name "
                                            "(letters, digits, '_' or '-')")
        _check_identifier(path, "name", args.name, "loss")
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if path.exists():
        print(f"error: {path} already exists; not overwriting it", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_environment().get_template("new_spec.toml.j2").render(name=args.name),
                    encoding="utf-8")
    print(f"wrote {path}\nedit it, then run: lossgen generate"
          + (f" --specs {args.specs} --out DIR" if Path(args.specs).resolve() != SPECS_DIR else ""))
    return 0


def _row_sizes(text: str) -> tuple[int, ...]:
    """--sizes: comma-separated positive row lengths ("2,3")."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def cmd_verify(args) -> int:
    from .derive import derive
    from .known_gaps import gap_of
    from .runtime import load
    from .spec import find_spec_files, load_spec
    from .verify import format_report, verify_derivatives, verify_loss
    from .verify_rows import ROW_POINTS, SIZES, verify_rows

    catalog = load(args.out)
    paths = [p for p in find_spec_files(args.specs) if not args.names or p.stem in args.names]
    unknown = set(args.names) - {p.stem for p in paths}
    if unknown:
        print(f"error: no spec named {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    rows = []
    for path in paths:
        started = time.perf_counter()
        spec = load_spec(path)
        if spec.rowwise:  # each size at each parameter set; a row checks up to C**2 Hessian entries, so fewer rows
            rows.extend(verify_rows(catalog.get(spec.name), spec, sizes=args.sizes or SIZES,
                                    n_random=min(args.points, ROW_POINTS), n_stress=ROW_POINTS if args.stress else 0,
                                    differences=args.derivatives, gap=gap_of(spec.name)))
        else:
            derivation = derive(spec)
            rows.extend(verify_loss(catalog.get(spec.name), derivation, n=args.points, stress=args.stress))
            if args.derivatives:
                rows.extend(verify_derivatives(derivation, n=args.points))
        print(f"verified {spec.name} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    print(format_report(rows, args.tolerance))
    gaps = [r for r in rows if r.in_known_gap]
    checked = [r for r in rows if not r.in_known_gap]
    failed = [r for r in checked if not r.ok(args.tolerance)]
    print(f"\n{len(checked) - len(failed)} of {len(checked)} outputs within relative error {args.tolerance:g}")
    if gaps:
        beyond = sum(not r.ok(args.tolerance) for r in gaps)
        print(f"{len(gaps)} more in known gaps (lossgen/known_gaps.py; README, Verification), "
              f"{beyond} of them beyond it")
    return 1 if failed else 0


def cmd_docs(args) -> int:
    from .docs import docs

    return docs(args.specs, args.kernels, args.out, pdf=args.pdf, check=args.check)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lossgen", description="Symbolic compiler for loss functions: "
                                     "specs -> derivatives -> stable Numba kernels, verified in high precision.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, function, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--specs", default=str(SPECS_DIR), help="spec folder (default: %(default)s)")
        p.set_defaults(function=function)
        return p

    p = add("generate", cmd_generate, "regenerate kernel modules from the specs")
    p.add_argument("--out", default=str(GENERATED_DIR), help="output folder (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the output is stale")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="processes rendering the specs whose modules are not current (default: the CPUs, %(default)s)")
    add("list", cmd_list, "list the losses of a spec folder")
    p = add("show", cmd_show, "show a loss, its gradient and Hessian as formulas")
    p.add_argument("name")
    p.add_argument("--unicode", action="store_true", help="typeset with Unicode characters")
    p = add("new", cmd_new, "scaffold a commented spec file that generates as is")
    p.add_argument("name")
    p.add_argument("--family", default="custom", help="subfolder of the spec folder (default: %(default)s)")
    p = add("verify", cmd_verify, "accuracy report: every kernel against the SymPy truth at 50 digits")
    p.add_argument("names", nargs="*", help="losses to verify (default: all)")
    p.add_argument("--out", default=str(GENERATED_DIR), help="generated folder (default: %(default)s)")
    p.add_argument("--points", type=int, default=200, help="random points per parameter set (default: 200; for a row-wise loss, rows per size, at most 12)")
    p.add_argument("--tolerance", type=float, default=1e-12, help="relative error bound (default: 1e-12)")
    p.add_argument("--stress", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate on the stress grid of extreme values (0, 1e-300, 745, 1e300, ...); "
                        "default: on")
    p.add_argument("--derivatives", action="store_true",
                   help="also check the symbolic derivatives against finite differences")
    p.add_argument("--sizes", type=_row_sizes, default=None,
                   help="row lengths C of the row-wise losses, comma-separated (default: 1,2,3,7)")
    p = add("docs", cmd_docs, "write the LaTeX formula reference (loss, gradient, Hessian, plots) from the specs")
    p.add_argument("--out", default=str(_DOCS_DIR), help="output folder (default: %(default)s)")
    p.add_argument("--kernels", default=str(GENERATED_DIR),
                   help="generated kernels of the same specs, for the plots (default: %(default)s)")
    p.add_argument("--pdf", action="store_true",
                   help="also compile lossgen-reference.pdf with latexmk or pdflatex")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the output (or its PDF) is stale; with --pdf, "
                        "also compile in a temporary folder as a test")
    args = parser.parse_args(argv)
    try:
        return args.function(args)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a SpecError from show or verify: file, field, column; no traceback
        from .spec import SpecError

        if not isinstance(error, SpecError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
