"""Shared fixtures: the catalog's specs and their derivations (derived once per session)."""
import functools

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
