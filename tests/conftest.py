"""Shared fixtures: the catalog's specs and their derivations (derived once per session)."""
import functools

import pytest

from lossgen.derive import derive
from lossgen.paths import SPECS_DIR
from lossgen.spec import find_spec_files, load_spec

ALL_PATHS = {path.stem: path for path in find_spec_files(SPECS_DIR)}
ROW_PATHS = {name: path for name, path in ALL_PATHS.items() if load_spec(path).rowwise}
ROW_NAMES = sorted(ROW_PATHS)
CATALOG_PATHS = {name: path for name, path in ALL_PATHS.items() if name not in ROW_PATHS}  # elementwise
CATALOG_NAMES = sorted(CATALOG_PATHS)


@functools.lru_cache(maxsize=None)
def derivation_of(name):
    return derive(load_spec(CATALOG_PATHS[name]))


def _loss_of(item) -> str | None:
    """The catalog loss a test exercises: a parameter that names one, else the longest name in
    the test's own name (None where it names none)."""
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if isinstance(value, str) and value in ALL_PATHS:
            return value
    named = [name for name in ALL_PATHS if name in item.name]
    return max(named, key=len) if named else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """The tests of one loss in one group (pyproject's --dist loadgroup), so that one worker
    compiles its module's kernels: on an empty Numba cache two workers compiled
    cosine_embedding's at once, 110 s each. Groups and the other tests go to the first free
    worker."""
    for item in items:
        loss = _loss_of(item)
        if loss is not None:
            item.add_marker(pytest.mark.xdist_group(loss))
