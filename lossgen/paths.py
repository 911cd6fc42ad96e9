"""Where lossgen finds its templates and, by default, the catalog's specs and kernels."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
SPECS_DIR = ROOT / "specs"
GENERATED_DIR = ROOT / "generated"
