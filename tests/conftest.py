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


def loss_of_test(nodeid: str) -> str | None:
    """The catalog loss a test exercises: the longest catalog name in its name and parameters
    (None where it names none)."""
    test = nodeid.rsplit("::", 1)[-1]
    named = [name for name in ALL_PATHS if name in test]
    return max(named, key=len) if named else None


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: no error where it is missing
def pytest_xdist_make_scheduler(config, log):
    """With -n (and no other --dist): the tests of one loss go to one worker, which compiles
    its module's kernels once (its first test writes them to Numba's cache, the others load
    them). Loss by loss, most tests first; a test that names no loss is a unit of its own.
    (``--dist loadgroup`` grouped nothing: pytest-xdist 3.8 renames a test by ``item._nodeid``,
    which pytest 9 does not read, and two workers compiled triplet_margin's kernels at once.)"""
    if config.getvalue("dist") != "load":
        return None  # a --dist that the command line names
    from xdist.scheduler import LoadScopeScheduling

    class ByLoss(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return loss_of_test(nodeid) or nodeid

    return ByLoss(config, log)
