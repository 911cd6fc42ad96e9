"""The formula reference end to end: specs and their generated kernels -> docs/ -> PDF.

``lossgen docs`` renders every spec in memory (``reference.tex`` and one fragment
``losses/<name>.tex`` per loss, through :mod:`lossgen.emit_latex`) and writes only when all
succeed, only the files whose text changed, removing fragments whose spec is gone; it never
touches files it did not write. The plots need the generated kernels of the same specs: a
kernel module whose spec hash differs from its spec is refused, so a plot can never show a
stale kernel. ``--pdf`` compiles the reference with latexmk (or pdflatex) into
``lossgen-reference.pdf``; the PDF records the hash of the LaTeX sources it was built from, so
``--check`` also finds a PDF that is out of date.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from .derive import derive
from .emit_latex import MARKER, plot_setup, render_reference, render_row_section, render_section
from .generate import _write_atomically, plan_writes
from .spec import SpecError, find_spec_files, load_spec

REFERENCE = "reference.tex"
FRAGMENTS = "losses"
PDF = "lossgen-reference.pdf"
JOB = "lossgen-reference"
_KERNEL_HASH = re.compile(r"^# lossgen-generated spec-sha256=([0-9a-f]{64})", re.M)
_PDF_HASH = re.compile(rb"/LossgenSources\s*\(sha256=([0-9a-f]{64})\)")

TEX_MISSING = """\
error: --pdf needs pdflatex (from TeX Live or MiKTeX), and there is none on PATH.
Install a TeX distribution with LaTeX, pgfplots and the Latin Modern fonts:
  Debian/Ubuntu: sudo apt-get install --no-install-recommends texlive-latex-base \\
                     texlive-latex-recommended texlive-pictures lmodern latexmk
                 (about 260 MB installed; texlive-full works too)
  macOS:         brew install --cask basictex, then
                     sudo tlmgr install latexmk pgf pgfplots lm booktabs mathtools
                 (or the full MacTeX: brew install --cask mactex-no-gui)
  Windows:       MiKTeX (https://miktex.org), which fetches missing packages on first use,
                 or TeX Live (https://tug.org/texlive)
then run `lossgen docs --pdf` again. The LaTeX sources in docs/ compile with any of them."""


def kernel_hash(module: Path) -> str | None:
    """The spec hash in a generated module's header (None if it is missing or not generated)."""
    try:
        with open(module, encoding="utf-8") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return None
    match = _KERNEL_HASH.search(head)
    return match.group(1) if match else None


def render_docs(specs_dir, kernels_dir, log: Callable[[str], None] = print) -> tuple[dict[str, str], list[str]]:
    """Render every spec under ``specs_dir``: ({relative path: text}, [error messages])."""
    from . import __version__
    from .runtime import load

    specs_dir, kernels_dir = Path(specs_dir), Path(kernels_dir)
    paths = find_spec_files(specs_dir)
    if not paths:
        return {}, [f"{specs_dir}: no spec files (*.toml) found"]
    files, errors, seen, entries, catalog = {}, [], {}, [], None
    width = len(str(len(paths)))
    for index, path in enumerate(paths, 1):
        relative = path.relative_to(specs_dir).as_posix()
        started = time.perf_counter()
        try:
            spec = load_spec(path)
            if spec.name in seen:
                raise SpecError(path, "name", f"duplicate loss name '{spec.name}', also defined in {seen[spec.name]}")
            seen[spec.name] = path
            loss = None
            if spec.rowwise:
                files[f"{FRAGMENTS}/{spec.name}.tex"] = render_row_section(spec, f"{specs_dir.name}/{relative}")
            elif plot_setup(spec)[0] is not None:
                module = kernels_dir / f"{spec.name}.py"
                found = kernel_hash(module)
                if found != spec.source_hash:
                    raise SpecError(path, "kernels", f"{module} is {'stale' if found else 'missing'}; the plots "
                                    f"need the kernels of this spec: run `lossgen generate --specs {specs_dir} "
                                    f"--out {kernels_dir}` first")
                catalog = catalog or load(kernels_dir)
                loss = catalog.get(spec.name)
            if not spec.rowwise:
                files[f"{FRAGMENTS}/{spec.name}.tex"] = render_section(derive(spec), f"{specs_dir.name}/{relative}", loss)
            entries.append((spec.name, spec.family, spec.title))
            status = f"{time.perf_counter() - started:.2f} s"
        except SpecError as error:
            errors.append(str(error))
            status = "FAILED"
        except Exception as error:  # a bug or a SymPy failure: still name the spec
            errors.append(f"{path}: {type(error).__name__}: {error}")
            status = "FAILED"
        log(f"[{index:>{width}}/{len(paths)}] {relative:<40} {status}")
    files[REFERENCE] = render_reference(entries, __version__)
    return files, errors


def sources_hash(files: dict[str, str]) -> str:
    """sha256 of the LaTeX sources (names and texts), as recorded in the PDF."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode("utf-8") + b"\0")
    return digest.hexdigest()


def pdf_hash(path: Path) -> str | None:
    """The sources hash a PDF built by ``lossgen docs --pdf`` records (None if none)."""
    try:
        match = _PDF_HASH.search(Path(path).read_bytes())
    except OSError:
        return None
    return match.group(1).decode() if match else None


def is_generated(path: Path) -> bool:
    """True for a .tex file written by lossgen: its first line is the marker comment."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith(f"% {MARKER}")
    except (OSError, UnicodeDecodeError):
        return False


def compare(files: dict[str, str], out_dir: Path) -> tuple[list[str], list[str]]:
    """(files to write because missing or different, generated fragments no longer produced)."""
    stale = [name for name, text in sorted(files.items())
             if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text]
    fragments = out_dir / FRAGMENTS
    extra = sorted(f"{FRAGMENTS}/{p.name}" for p in fragments.glob("*.tex")
                   if f"{FRAGMENTS}/{p.name}" not in files and is_generated(p)) if fragments.is_dir() else []
    return stale, extra


# --- the PDF ---------------------------------------------------------------------------------

_OVERFULL = re.compile(r"^Overfull \\[hv]box \(([\d.]+)pt too (?:wide|high)\) (.*)$", re.M)


def _log_problems(log_text: str) -> tuple[list[str], list[str]]:
    """(errors, overfull boxes) from a pdflatex log."""
    lines = log_text.splitlines()
    errors = []
    for i, line in enumerate(lines):
        if line.startswith("!") or re.match(r"^\S+\.tex:\d+: ", line):
            errors.append("\n".join(lines[i:i + 4]))
    overfull = []
    for match in _OVERFULL.finditer(log_text):
        where = match.group(2)
        # the file being read at that point: the last "(./losses/x.tex" opened before it
        opened = re.findall(r"\(\./?(losses/[\w.-]+\.tex|reference\.tex)", log_text[:match.start()])
        overfull.append(f"{opened[-1] if opened else JOB + '.tex'}: {match.group(1)} pt too wide/high, {where}")
    return errors, overfull


def compile_pdf(files: dict[str, str], target: Path | None, log: Callable[[str], None] = print) -> int:
    """Compile the reference; copy the PDF to ``target`` (None: compile only, as a test).

    Returns 0, or 1 when LaTeX fails or something overflows the page (the PDF is still
    written then, to look at), or 3 when no TeX is installed.
    """
    latexmk, pdflatex = shutil.which("latexmk"), shutil.which("pdflatex")
    if not pdflatex:
        log(TEX_MISSING)
        return 3
    started = time.perf_counter()
    digest = sources_hash(files)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}
    with tempfile.TemporaryDirectory(prefix="lossgen-docs-") as build:
        build = Path(build)
        for name, text in files.items():
            (build / name).parent.mkdir(parents=True, exist_ok=True)
            (build / name).write_text(text, encoding="utf-8")
        (build / f"{JOB}.tex").write_text(
            "%% the reference, with the hash of its sources for `lossgen docs --check`\n"
            f"\\def\\lossgensourcehash{{{digest}}}\\input{{{REFERENCE}}}\n", encoding="utf-8")
        options = ["-interaction=nonstopmode", "-halt-on-error", "-file-line-error"]
        if target is None:  # a test: one pass shows every error and overflow (references need not resolve)
            runs, latexmk = [[pdflatex, *options, f"{JOB}.tex"]], None
        elif latexmk:
            runs = [[latexmk, "-pdf", "-quiet", *options, f"{JOB}.tex"]]
        else:
            runs = [[pdflatex, *options, f"{JOB}.tex"]] * 4
        tool = "latexmk" if latexmk else "pdflatex"
        log_path = build / f"{JOB}.log"
        for run_number, command in enumerate(runs):
            result = subprocess.run(command, cwd=build, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
            log_text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
            if result.returncode != 0:
                errors, _ = _log_problems(log_text)
                log(f"error: {tool} failed (exit {result.returncode}):")
                for message in errors[:5] or [result.stdout[-3000:]]:
                    log(message)
                return 1
            if not latexmk and run_number >= 1 and not re.search(r"Rerun|rerun", log_text):
                break
        _, overfull = _log_problems(log_text)
        pdf = build / f"{JOB}.pdf"
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(pdf, temporary)
            os.replace(temporary, target)
        pages = len(re.findall(rb"/Type\s*/Page\b", pdf.read_bytes()))
    where = f"wrote {target}" if target is not None else "compiled in one pass (not kept)"
    log(f"{where}: {pages} pages, {tool} {time.perf_counter() - started:.1f} s")
    if overfull:
        for message in overfull:
            log(f"overflow: {message}")
        log(f"error: {len(overfull)} box(es) overflow the page; shorten the text or formula")
        return 1
    return 0


# --- the command ------------------------------------------------------------------------------

def docs(specs_dir, kernels_dir, out_dir, pdf: bool = False, check: bool = False,
         log: Callable[[str], None] = print) -> int:
    """``lossgen docs``: (re)write the LaTeX reference in ``out_dir``; with ``pdf``, compile it;
    with ``check``, write nothing and exit 1 if ``out_dir`` is stale (with ``pdf`` too,
    compile into a temporary folder, as a test that it compiles). Returns an exit code."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    files, errors = render_docs(specs_dir, kernels_dir, log)
    plan = plan_writes(files, errors, out_dir, "documentation", log, ours=is_generated, stale_files=compare)
    if plan is None:
        return 1
    stale, extra = plan
    digest = sources_hash(files)
    if check:
        status = 0
        for name in stale:
            log(f"stale: {out_dir / name} differs from what the specs produce")
        for name in extra:
            log(f"stale: {out_dir / name} has no spec any more")
        recorded = pdf_hash(out_dir / PDF)
        if recorded != digest:
            log(f"stale: {out_dir / PDF} " + ("is missing" if not (out_dir / PDF).exists()
                                              else "was built from other sources"))
        if stale or extra or recorded != digest:
            log("the documentation is out of date; run `lossgen docs --pdf`")
            status = 1
        else:
            log(f"{out_dir}: all {len(files)} files and the PDF up to date")
        if pdf:
            status = max(status, compile_pdf(files, None, log))
        return status
    (out_dir / FRAGMENTS).mkdir(parents=True, exist_ok=True)
    for name in stale:
        _write_atomically(out_dir / name, files[name])
    for name in extra:
        (out_dir / name).unlink()
    log(f"{out_dir}: {len(files) - 1} losses; {len(stale)} file(s) written, {len(extra)} removed, "
        f"{len(files) - len(stale)} unchanged ({time.perf_counter() - started:.1f} s)")
    if pdf:
        if pdf_hash(out_dir / PDF) == digest:
            log(f"{out_dir / PDF} is up to date")
            return 0
        return compile_pdf(files, out_dir / PDF, log)
    return 0
