"""The pipeline end to end: a folder of specs -> a folder of kernel modules.

Every spec is parsed, derived, stabilised and rendered in memory first; files are written
only when all of them succeed, so a failing spec leaves the output folder untouched. Only
files whose text changed are rewritten (atomically), and generated files whose spec is gone
are removed. Files not written by lossgen are never touched.

A spec that marks names ``specialise = true`` makes a second module, ``_<name>_defaults.py``:
the same pipeline on the loss with those names at their defaults (:meth:`LossSpec.at_defaults`).

Rendering is skipped for a spec whose module is already on disk as the same inputs made it:
:class:`RenderCache` records, per module, a hash of everything its text depends on (the spec's
bytes and path, lossgen's source and templates, the Python, SymPy and Jinja2 versions) and the
hash of the text; where both still match, the file on disk is the output (``--check`` records
its findings too, when every file is current). The record lives in
the user's cache folder (``$LOSSGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/lossgen``, else
``~/.cache/lossgen``), one small file per output folder, never in the output folder itself;
deleting it only costs time.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import jinja2
import sympy

from .derive import derive
from .derive_rows import derive_rows
from .emit_rows import render_row_module
from .emit import MARKER, render_module, render_package_init
from .paths import TEMPLATES_DIR
from .spec import SpecError, find_spec_files, load_spec
from .stabilise import stabilise_derivation
from .stabilise_rows import stabilise_rows

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_VARIABLE = "LOSSGEN_CACHE_DIR"


def cache_file(out_dir) -> Path:
    """Where the render record of ``out_dir`` is kept (see the module's docstring)."""
    root = os.environ.get(CACHE_VARIABLE) or ""
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lossgen"
    folder = str(Path(out_dir).resolve())
    return Path(root) / f"generate-{hashlib.sha256(folder.encode()).hexdigest()[:16]}.json"


def build_module(spec, spec_path: str) -> str:
    """spec -> derive -> stabilise -> emit: the text of one kernel module."""
    if spec.rowwise:
        derivation = derive_rows(spec)
        return render_row_module(derivation, stabilise_rows(derivation), spec_path)
    derivation = derive(spec)
    return render_module(derivation, stabilise_derivation(derivation), spec_path)


def modules_of(spec) -> list[tuple[str, object]]:
    """(file name, spec) of each module a spec makes: its kernels, and where the spec marks
    names ``specialise = true``, the kernels specialised at their defaults."""
    modules = [(f"{spec.name}.py", spec)]
    if spec.specialised_module:
        modules.append((f"{spec.specialised_module}.py", spec.at_defaults()))
    return modules


def pipeline_fingerprint() -> str:
    """sha256 of what, besides a spec, decides a module's text: lossgen's source (every
    stage), the templates, and the versions of Python, SymPy and Jinja2."""
    digest = hashlib.sha256()
    for version in (sys.version, sympy.__version__, jinja2.__version__):
        digest.update(version.encode() + b"\0")
    for folder in (PACKAGE_DIR, TEMPLATES_DIR):
        for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".tmp"):
                digest.update(f"{folder.name}/{path.relative_to(folder).as_posix()}".encode() + b"\0")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RenderCache:
    """Which modules in ``out_dir`` are what their inputs produce, so their rendering can be
    skipped: {file name: (hash of the inputs, hash of the text)}, kept in :func:`cache_file`."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = cache_file(out_dir)
        self.fingerprint = pipeline_fingerprint()
        try:
            self.entries = json.loads(self.path.read_text(encoding="utf-8"))["modules"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}
        self.used: dict[str, list[str]] = {}

    def key(self, spec, spec_path: str) -> str:
        """The hash of every input of one module's text."""
        return hashlib.sha256(f"{self.fingerprint}\0{spec_path}\0{spec.source_hash}".encode()).hexdigest()

    def lookup(self, name: str, key: str) -> str | None:
        """The text of ``name`` on disk if the same inputs produced it, else None."""
        entry = self.entries.get(name)
        if not isinstance(entry, list) or entry[0] != key:
            return None
        try:
            text = (self.out_dir / name).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return text if _text_hash(text) == entry[1] else None

    def record(self, name: str, key: str, text: str):
        self.used[name] = [key, _text_hash(text)]

    def save(self):
        """Keep the entries of this run (best effort: without the cache, generation is slower only)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"out": str(self.out_dir.resolve()), "modules": self.used}, indent=1, sort_keys=True)
            _write_atomically(self.path, text + "\n")
        except OSError:
            pass


def _render_job(job: tuple[str, str, str]) -> tuple[str | None, str, float]:
    """Render one module, in this process or a worker's: (text or None, error, seconds)."""
    path, spec_path, name = job
    started = time.perf_counter()
    try:
        module_spec = dict(modules_of(load_spec(path)))[name]
        return build_module(module_spec, spec_path), "", time.perf_counter() - started
    except Exception as error:  # a bug or a SymPy failure: still name the spec
        return None, f"{path}: {type(error).__name__}: {error}", time.perf_counter() - started


def _rendered(jobs: list, workers: int):
    """_render_job of each job, in order: in this process, or in ``workers`` fresh processes
    ('spawn': safe where the caller runs threads, e.g. Numba's)."""
    if workers <= 1 or len(jobs) <= 1:
        return map(_render_job, jobs)
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
    results = pool.map(_render_job, jobs)

    def in_order():
        with pool:
            yield from results
    return in_order()


def render_all(specs_dir, log: Callable[[str], None] = print,
               cache: RenderCache | None = None, jobs: int = 1) -> tuple[dict[str, str], list[str]]:
    """Render every spec under ``specs_dir``: ({file name: text}, [error messages]). With
    ``cache``, a module that its inputs already produced on disk is read, not rendered; with
    ``jobs`` > 1, the others are rendered in that many processes (the same text, in the same
    order). One line per spec is logged, in order, as its modules are ready."""
    specs_dir = Path(specs_dir)
    paths = find_spec_files(specs_dir)
    if not paths:
        return {}, [f"{specs_dir}: no spec files (*.toml) found"]
    files, errors, seen, entries = {}, [], {}, []
    plans = []  # per spec: (relative path, error or None, [(name, key, cached text or None)])
    render = []  # (spec file, spec path as the module cites it, module name) to render
    for path in paths:
        relative = path.relative_to(specs_dir).as_posix()
        try:
            spec = load_spec(path)
            if spec.name in seen:
                raise SpecError(path, "name", f"duplicate loss name '{spec.name}', also defined in {seen[spec.name]}")
            seen[spec.name] = path
            spec_path = f"{specs_dir.name}/{relative}"
            key = cache.key(spec, spec_path) if cache else None
            modules = [(name, key, cache.lookup(name, key) if cache else None) for name, _ in modules_of(spec)]
            render += [(str(path), spec_path, name) for name, _, text in modules if text is None]
            plans.append((relative, None, modules))
            entries.append((spec.name, spec.family, spec.title))
        except SpecError as error:
            plans.append((relative, str(error), []))
        except Exception as error:  # a bug or a SymPy failure: still name the spec
            plans.append((relative, f"{path}: {type(error).__name__}: {error}", []))

    results = _rendered(render, jobs)
    width = len(str(len(paths)))
    for index, (relative, error, modules) in enumerate(plans, 1):
        status, seconds = ("FAILED", 0.0) if error else ("unchanged inputs", 0.0)
        if error:
            errors.append(error)
        for name, key, text in modules:
            if text is None:
                text, failure, spent = next(results)
                seconds += spent
                if text is None:
                    errors.append(failure)
                    status = "FAILED"
                    continue
                status = "FAILED" if status == "FAILED" else f"{seconds:.2f} s"
            if cache:
                cache.record(name, key, text)
            files[name] = text
        log(f"[{index:>{width}}/{len(paths)}] {relative:<40} {status}")
    files["__init__.py"] = render_package_init(sorted(entries))
    return files, errors


def is_generated(path: Path) -> bool:
    """True for a file written by lossgen: its marker is a comment before the first line of code
    (after the module docstring, however long that is)."""
    try:
        with open(path, "rb") as handle:
            for token in tokenize.tokenize(handle.readline):
                if token.type == tokenize.COMMENT and token.string.startswith(f"# {MARKER}"):
                    return True
                if token.type == tokenize.NAME:  # the first statement: the header is over
                    return False
    except (OSError, SyntaxError, tokenize.TokenError, UnicodeDecodeError):
        return False
    return False


def compare(files: dict[str, str], out_dir: Path) -> tuple[list[str], list[str]]:
    """(files to write because missing or different, generated files no longer produced)."""
    stale = [name for name, text in sorted(files.items())
             if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text]
    extra = sorted(p.name for p in out_dir.glob("*.py") if p.name not in files and is_generated(p)) \
        if out_dir.is_dir() else []
    return stale, extra


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, text: str):
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600; give it open()'s mode
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def plan_writes(files: dict[str, str], errors: list[str], out_dir: Path, what: str,
                log: Callable[[str], None], ours: Callable[[Path], bool] = None,
                stale_files: Callable = None) -> tuple[list[str], list[str]] | None:
    """(stale, extra) as ``stale_files`` (default :func:`compare`) finds them, or None, with the
    reason logged, where nothing may be written: a spec failed (``what`` failed), or a file to
    write was not written by lossgen (``ours``, default :func:`is_generated`, says which are)."""
    ours, stale_files = ours or is_generated, stale_files or compare
    if errors:
        for message in errors:
            log(f"error: {message}")
        log(f"{what} failed ({len(errors)} error(s)); {out_dir} was left untouched")
        return None
    for name in files:
        target = out_dir / name
        if target.exists() and not ours(target):
            log(f"error: {target} exists and was not written by lossgen; refusing to overwrite it")
            return None
    return stale_files(files, out_dir)


def generate(specs_dir, out_dir, check: bool = False, log: Callable[[str], None] = print, jobs: int = 1) -> int:
    """Regenerate ``out_dir`` from ``specs_dir``; with ``check``, only report. ``jobs``: how
    many processes render the specs whose modules are not current. Returns an exit code."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    cache = RenderCache(out_dir)
    files, errors = render_all(specs_dir, log, cache, jobs)
    plan = plan_writes(files, errors, out_dir, "generation", log)
    if plan is None:
        return 1
    stale, extra = plan
    if check:
        if stale or extra:
            for name in stale:
                log(f"stale: {out_dir / name} differs from what the specs produce")
            for name in extra:
                log(f"stale: {out_dir / name} has no spec any more")
            log("generated files are out of date; run `lossgen generate`")
            return 1
        cache.save()  # every file on disk is what its inputs produce: the next run may skip them
        log(f"{out_dir}: all {len(files)} files up to date")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        _write_atomically(out_dir / name, files[name])
    for name in extra:
        (out_dir / name).unlink()
    cache.save()
    losses = sum(1 for name in files if not name.startswith("_"))  # not __init__.py, not specialised kernels
    log(f"{out_dir}: {losses} losses; {len(stale)} file(s) written, {len(extra)} removed, "
        f"{len(files) - len(stale)} unchanged ({time.perf_counter() - started:.1f} s)")
    return 0
