"""Side by side: generated kernels that take lossgen's vectorising exp/expm1 (_vexp, _vexpm1)
against the same modules as committed at a git revision (libm's exp and expm1), in one process.

    python benchmarks/vector_exp.py [--rev HEAD] [--n 1000000] [--repeat 21] [NAME ...]
    python benchmarks/vector_exp.py --functions [--points 20000]

For each kernel of each module (serial loops, no weights, preallocated outputs): whether its
loop is vectorised (AVX2 packed fused multiply-adds in its assembly), its time per element before
and after (medians of --repeat runs, taken in turn), the ratio and the largest relative
difference of the results. With --functions: _vexp and _vexpm1 themselves (rendered from the
template) against mpmath at 50 digits, in units in the last place, beside glibc's exp and expm1,
on about 4 --points points (the whole range, near 0, tiny arguments, near overflow, subnormal
results, special values); and their time per element in a loop of --n, beside glibc's and
NumPy's."""
import argparse
import importlib.util
import inspect
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(module, n, rng):
    values = []
    for name, role, domain in module.SPEC["inputs"]:
        values.append({
            "probability": lambda: rng.uniform(0, 1, n).round(),
            "nonnegative": lambda: rng.poisson(2.0, n).astype(float),
            "nonpositive": lambda: -rng.exponential(2.0, n),
            "label_pm1": lambda: rng.choice([-1.0, 1.0], n),
        }.get(domain, lambda: rng.normal(0, 3, n))())
    return values + [default for _, default, _ in module.SPEC["params"]]


def vectorised(kernel) -> bool:
    return bool(re.search(r"vfmadd\w*pd\s+%?ymm", kernel.inspect_asm(kernel.signatures[0])))


def functions(points: int, n: int, repeat: int):
    import math
    import mpmath
    import numba
    from lossgen.emit import template_environment
    source = "import math\n\nimport numba\n\n\n" + template_environment().get_template(
        "numba_helpers.py.j2").render(helpers={"vexp", "vexpm1", "exp_core", "vlog1p"})
    path = Path(tempfile.mkdtemp()) / "vector_exp_helpers.py"
    path.write_text(source)
    helpers = load(path, "vector_exp_helpers")
    vexp, vexpm1, vlog1p = helpers._vexp, helpers._vexpm1, helpers._vlog1p

    def loop(f):
        @numba.njit(error_model="numpy")
        def run(x, out):
            for i in range(x.shape[0]):
                out[i] = f(x[i])
        return run

    loops = {"_vexp": loop(vexp), "glibc exp": loop(numba.njit(lambda v: math.exp(v))),
             "_vexpm1": loop(vexpm1), "glibc expm1": loop(numba.njit(lambda v: math.expm1(v))),
             "_vlog1p": loop(vlog1p), "glibc log1p": loop(numba.njit(lambda v: math.log1p(v)))}
    rng = np.random.default_rng(1)
    x_exp = np.concatenate([
        rng.uniform(-745.2, 709.8, points), rng.uniform(-1, 1, points), rng.uniform(-1e-3, 1e-3, points // 4),
        rng.choice([-1.0, 1.0], points // 4) * 10.0 ** rng.uniform(-320, 0, points // 4),
        rng.uniform(-40, 40, points), rng.uniform(709.0, 709.79, points // 10), rng.uniform(-745.2, -708.0, points // 4),
        rng.uniform(-0.5, 0.5, points // 4) * math.log(2) + rng.integers(-3, 4, points // 4) * math.log(2) / 2,
        [0.0, -0.0, math.inf, -math.inf, math.nan, 709.782712893384, 709.7827128933841, -745.1332191019411,
         -745.1332191019412, 5e-324, -5e-324, 1e-300, -1e-300, 37.4, 37.5, -37.5, 750.0, -750.0]])
    tiny = 10.0 ** rng.uniform(-320, 0, points)
    x_log1p = np.concatenate([
        rng.choice([-1.0, 1.0], points) * 10.0 ** rng.uniform(-300, 0, points), 10.0 ** rng.uniform(-300, 300, points),
        tiny * rng.choice([-1.0, 1.0], points), rng.uniform(0, 1, points), np.exp(-rng.uniform(0, 40, points)),
        -1 + 10.0 ** rng.uniform(-16, 0, points), rng.uniform(-1, 1, points), rng.uniform(-0.35, 0.45, points),
        [0.0, -0.0, math.inf, -math.inf, math.nan, -1.0, -1.5, -1e300, 5e-324, -5e-324, 1e-300, -1e-300, 2.0 ** -53,
         -0.2928932188134524, 0.41421356237309503, 1.0, 1.7976931348623157e308, -1 + 2.0 ** -52, 1e-16, -1e-16]])
    print(f"{len(x_exp)} points (log1p: {len(x_log1p)}) against mpmath at 50 digits; error in units in the last place "
          "of the truth")
    for name in loops:
        truth_function = {"exp": mpmath.exp, "expm1": mpmath.expm1, "log1p": mpmath.log1p}[name.split("_v")[-1].split()[-1]]
        x = x_log1p if name.endswith("log1p") else x_exp
        y = np.empty_like(x)
        loops[name](x, y)
        errors, bad = [], 0
        with mpmath.workdps(50):
            for xi, yi in zip(x.tolist(), y.tolist()):
                if math.isnan(xi) or math.isinf(xi) or (truth_function is mpmath.log1p and xi <= -1):
                    expected = math.nan if math.isnan(xi) or xi < -1 else (
                        -math.inf if xi == -1 else float(truth_function(mpmath.mpf(xi))))
                    bad += not (math.isnan(yi) if math.isnan(expected) else yi == expected)
                    continue
                truth = truth_function(mpmath.mpf(xi))
                if truth == 0 or math.isinf(float(truth)):
                    bad += yi != float(truth) or (truth_function is mpmath.log1p and math.copysign(1, yi) != math.copysign(1, xi))
                    continue
                e = int(mpmath.floor(mpmath.log(abs(truth), 2)))
                errors.append(float(abs(mpmath.mpf(yi) - truth) / mpmath.ldexp(1, max(e - 52, -1074))))
        errors = np.array(errors)
        print(f"  {name:12s} max {errors.max():.3f}  mean {errors.mean():.4f}  wrong specials/limits {bad}")
    z = rng.uniform(-5, 5, n)
    z_log1p = rng.uniform(0, 1, n)  # softplus: log1p(exp(-|x|))
    out = np.empty(n)
    runs = {**{name: (lambda f=f, z=z_log1p if name.endswith("log1p") else z: f(z, out)) for name, f in loops.items()},
            "np.exp": lambda: np.exp(z, out=out), "np.expm1": lambda: np.expm1(z, out=out),
            "np.log1p": lambda: np.log1p(z_log1p, out=out)}
    times = {name: [] for name in runs}
    for f in runs.values():
        f()
    for _ in range(repeat):
        for name, f in runs.items():
            t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
    print(f"loop over {n} elements of uniform(-5, 5) (log1p: uniform(0, 1)), medians of {repeat}, ns per element:")
    for name, ts in times.items():
        print(f"  {name:12s} {np.median(ts) * 1e9 / n:6.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--functions", action="store_true")
    parser.add_argument("--points", type=int, default=20000)
    args = parser.parse_args()
    if args.functions:
        return functions(args.points, args.n, args.repeat)
    names = args.names or sorted(p.stem for p in (ROOT / "generated").glob("*.py")
                                 if "_vexp" in p.read_text())
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    print(f"n = {args.n}, medians of {args.repeat}, serial kernels; before = {args.rev}")
    for name in names:
        old = tmp / f"{name}_before.py"
        old.write_text(subprocess.run(["git", "show", f"{args.rev}:generated/{name}.py"], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)
        new = tmp / f"{name}_after.py"  # a copy: Numba's cache of generated/ stays the package's
        new.write_text((ROOT / "generated" / f"{name}.py").read_text())
        before, after = load(old, f"{name}_before"), load(new, f"{name}_after")
        values = inputs(after, args.n, rng)
        for kernel, count in after.SPEC["kernels"].items():
            if "_vexp" not in inspect.getsource(getattr(after, f"{kernel}_scalar")):
                continue
            fa, fb = getattr(before, f"{kernel}_kernel"), getattr(after, f"{kernel}_kernel")
            oa = [np.empty(args.n) for _ in range(count)]
            ob = [np.empty(args.n) for _ in range(count)]
            fa(*values, None, *oa)
            fb(*values, None, *ob)
            ta, tb = [], []
            for _ in range(args.repeat):
                t = time.perf_counter(); fa(*values, None, *oa); ta.append(time.perf_counter() - t)
                t = time.perf_counter(); fb(*values, None, *ob); tb.append(time.perf_counter() - t)
            with np.errstate(all="ignore"):
                diff = max(float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))) for a, b in zip(oa, ob))
            a, b = np.median(ta) * 1e9 / args.n, np.median(tb) * 1e9 / args.n
            print(f"{name:38s} {kernel:15s} vectorised {str(vectorised(fb)):5s} before {a:6.2f} after {b:6.2f} "
                  f"ns/element  ratio {b / a:.2f}  max rel diff {diff:.1e}", flush=True)
        for suffix in ("", "_parallel") if "_vexp" in inspect.getsource(after.loss_scalar) else ():
            # the sum: a reduction, in index order (serial) or by blocks (parallel)
            fa, fb = getattr(before, f"loss_sum_kernel{suffix}"), getattr(after, f"loss_sum_kernel{suffix}")
            sa, sb = fa(*values, None), fb(*values, None)
            ta, tb = [], []
            for _ in range(args.repeat):
                t = time.perf_counter(); fa(*values, None); ta.append(time.perf_counter() - t)
                t = time.perf_counter(); fb(*values, None); tb.append(time.perf_counter() - t)
            a, b = np.median(ta) * 1e9 / args.n, np.median(tb) * 1e9 / args.n
            print(f"{name:38s} {'loss_sum' + suffix:15s} vectorised {str(vectorised(fb)):5s} before {a:6.2f} after {b:6.2f} "
                  f"ns/element  ratio {b / a:.2f}  rel diff {abs(sa - sb) / abs(sa):.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
