"""Shared fixtures: the catalog's specs and their derivations (derived once per session)."""
import functools

from lossgen.derive import derive
from lossgen.paths import SPECS_DIR
from lossgen.spec import find_spec_files, load_spec

CATALOG_PATHS = {path.stem: path for path in find_spec_files(SPECS_DIR)}
CATALOG_NAMES = sorted(CATALOG_PATHS)


@functools.lru_cache(maxsize=None)
def derivation_of(name):
    return derive(load_spec(CATALOG_PATHS[name]))
