"""Kernels are compiled lazily, once: a second process loads them from Numba's disk cache."""
import json
import subprocess
import sys

from lossgen.generate import generate
from lossgen.paths import SPECS_DIR

PROBE = """
import json, sys
import numpy as np
import lossgen
catalog = lossgen.load(sys.argv[1])
mse = catalog.get("mse")
mse.loss(np.ones(4), np.zeros(4))
stats = mse.module.loss_sum_kernel.stats
untouched = mse.module.grad_kernel.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "other_kernel_compiled": len(mse.module.grad_kernel.signatures)}))
"""


def _run(folder):
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_loads_compiled_kernels_from_the_cache(tmp_path):
    specs = tmp_path / "specs" / "regression"
    specs.mkdir(parents=True)
    (specs / "mse.toml").write_text((SPECS_DIR / "regression" / "mse.toml").read_text())
    out = tmp_path / "kernels"
    assert generate(tmp_path / "specs", out, log=lambda line: None) == 0

    first = _run(out)
    assert first["misses"] == 1 and first["hits"] == 0
    assert first["other_kernel_compiled"] == 0  # only what was called got compiled
    second = _run(out)
    assert second["misses"] == 0 and second["hits"] == 1
