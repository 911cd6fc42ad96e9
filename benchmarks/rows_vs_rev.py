"""Side by side: the row-wise kernels of generated/ against the same modules as committed at a
git revision, in one process.

    python benchmarks/rows_vs_rev.py --rev REV NAME ... [--sizes 20000x10,2000x50] [--repeat 9]
    python benchmarks/rows_vs_rev.py --rev REV ssim_global --near   # x = y + N(0, 0.01)
    python benchmarks/rows_vs_rev.py --rev REV NAME --kernels hess_full --sizes 2000x10
    python benchmarks/rows_vs_rev.py --rev REV NAME --compile --kernels grad,hess_full,hvp

For each module, size N x C and kernel (loss, grad, hess, or --kernels, hess_full and hvp among
them, the product's directions normal; serial, no weights, preallocated outputs): the time before (ms, median of --repeat runs) and the ratio after/before, the two
taken in turn in each run, so that a busy machine slows both alike. Inputs are drawn from each
input's domain (random normal rows for embeddings and reals, uniform in [0, 1] for probabilities
and pixels, random class indices and labels); with --near, a prediction on [0, 1] is the
target plus N(0, 0.01) noise, clipped (an image near its target). Both modules are compiled
before the runs, in a Numba cache of their own.

With --compile: the first call of each kernel instead (seconds, Numba compiling it), the kernels
called in the order given, each module in a process of its own on an empty Numba cache, so that
a kernel that reuses another's compiled functions shows it (the product after the full Hessian)."""
import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("loss", "grad", "hess")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw(domain: str, shape, columns: int, rng):
    """An input of ``shape`` drawn from its domain (a class index: in [0, columns))."""
    return {
        "unit_interval": lambda: rng.uniform(0, 1, shape),
        "probability": lambda: rng.uniform(0, 1, shape),
        "nonnegative": lambda: np.abs(rng.normal(size=shape)),
        "positive": lambda: np.abs(rng.normal(size=shape)) + 1e-3,
        "class_index": lambda: rng.integers(0, columns, shape).astype(np.int64),
        "label_pm1": lambda: rng.choice([-1.0, 1.0], shape),
        "label01": lambda: rng.choice([0.0, 1.0], shape),
        "cosine": lambda: rng.uniform(-1, 1, shape),
    }.get(domain, lambda: rng.normal(size=shape))()


def arguments(module, rows: int, columns: int, near: bool, rng) -> list:
    values, targets = [], {}
    for name, role, domain, axis, shared, default in module.SPEC["inputs"]:
        shape = (columns,) if shared else (rows, columns) if axis else (rows,)
        value = draw(domain, shape, columns, rng)
        if near and role == "prediction" and domain in ("unit_interval", "probability") and targets:
            target = next(iter(targets.values()))
            value = np.clip(target + rng.normal(0, 0.01, shape), 0, 1)
        if role == "target" and axis:
            targets[name] = value
        values.append(value)
    return values + [default for _, default, _ in module.SPEC["params"]]


def outputs(module, kernel: str, rows: int, columns: int) -> list:
    count = module.SPEC["kernels"][kernel]
    if kernel == "hess_full":  # a (C, C) block per pair of predictions
        return [np.empty((rows, columns, columns)) for _ in range(count)]
    return [np.empty(rows)] if kernel == "loss" else [np.empty((rows, columns)) for _ in range(count)]


def first_calls(path: str, kernels: list, rows: int, columns: int) -> list:
    """Seconds of the first call of each kernel of the module at ``path``, in order."""
    module = load(Path(path), Path(path).stem)
    values = arguments(module, rows, columns, False, np.random.default_rng(0))
    seconds = []
    for kernel in kernels:
        out = outputs(module, kernel, rows, columns)
        directions = [np.random.default_rng(1).normal(size=(rows, columns)) for _ in range(len(out))] \
            if kernel == "hvp" else []
        start = time.perf_counter()
        getattr(module, f"{kernel}_kernel")(*values, *directions, None, *out)
        seconds.append(time.perf_counter() - start)
    return seconds


def compile_times(folder: Path, names: list, rev: str, kernels: list):
    """The --compile table: each module's first calls, before and after, in fresh processes."""
    print(f"after = generated/, before = {rev}; first call on an empty Numba cache: s before, after/before")
    print(f"{'loss':<20}  " + "  ".join(f"{k:>16}" for k in kernels))
    for name in names:
        times = []
        for old in (True, False):
            path = module_file(folder, name, rev if old else None)
            env = {**os.environ, "NUMBA_CACHE_DIR": tempfile.mkdtemp(dir=folder)}
            run = subprocess.run([sys.executable, __file__, name, "--first-calls", str(path), "--kernels", ",".join(kernels)],
                                 env=env, check=True, capture_output=True, text=True)
            times.append([float(v) for v in run.stdout.split()])
        cells = [f"{b:8.1f} {a / b:7.2f}" for b, a in zip(*times)]
        print(f"{name:<20}  " + "  ".join(f"{c:>16}" for c in cells))


def module_file(folder: Path, name: str, rev: str | None) -> Path:
    """A copy of generated/NAME.py, as committed at ``rev`` (None: as it is now)."""
    path = folder / f"{'before' if rev else 'after'}_{name}.py"
    path.write_text(subprocess.run(["git", "show", f"{rev}:generated/{name}.py"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout if rev
                    else (ROOT / "generated" / f"{name}.py").read_text())
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--sizes", default="20000x10,2000x50")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--near", action="store_true")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--compile", action="store_true", help="first-call (compile) times instead")
    parser.add_argument("--first-calls", help=argparse.SUPPRESS)  # --compile's worker: a module file
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    if args.first_calls:
        print(*first_calls(args.first_calls, kernels, 4, 3))
        return
    folder = Path(tempfile.mkdtemp())
    if args.compile:
        compile_times(folder, args.names, args.rev, kernels)
        return
    os.environ.setdefault("NUMBA_CACHE_DIR", str(folder / "numba"))
    sys.path.insert(0, str(folder))
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    print(f"after = generated/, before = {args.rev}; ms before, after/before; medians of {args.repeat}")
    print(f"{'loss':<20} {'N x C':>12}  " + "  ".join(f"{k:>16}" for k in kernels))
    for name in args.names:
        old, new = module_file(folder, name, args.rev), module_file(folder, name, None)
        before, after = load(old, old.stem), load(new, new.stem)
        for rows, columns in sizes:
            values = arguments(after, rows, columns, args.near, np.random.default_rng(0))
            cells = []
            for kernel in kernels:
                out = outputs(after, kernel, rows, columns)
                # the product's directions: one row of normal values per prediction
                directions = [np.random.default_rng(1).normal(size=(rows, columns)) for _ in range(len(out))] \
                    if kernel == "hvp" else []
                calls = [functools.partial(getattr(m, f"{kernel}_kernel"), *values, *directions) for m in (before, after)]
                for call in calls:
                    call(None, *out)
                times = [[], []]
                for _ in range(args.repeat):
                    for t, call in zip(times, calls):
                        start = time.perf_counter()
                        call(None, *out)
                        t.append(time.perf_counter() - start)
                old_time, new_time = (float(np.median(t)) for t in times)
                cells.append(f"{old_time * 1e3:8.2f} {new_time / old_time:7.2f}")
            print(f"{name:<20} {f'{rows} x {columns}':>12}  " + "  ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
