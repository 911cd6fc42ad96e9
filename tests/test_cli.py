"""The `lossgen` command line, run in subprocesses as a user would, from a scratch folder."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lossgen

REPO = Path(__file__).resolve().parents[1]
REPO_SPECS = REPO / "specs"
CATALOG = ["mse", "mae", "smooth_l1", "huber", "pseudo_huber", "charbonnier", "msle", "log_cosh",
           "cauchy", "cauchy_rho", "quantile", "poisson", "l1_penalty", "l2_penalty", "elastic_net"]
MARKER = "# lossgen-generated"


def run_cli(*args, cwd, env=None, check_rc=None):
    """Run `python -m lossgen ARGS` in ``cwd``; return (exit code, stdout + stderr)."""
    result = subprocess.run([sys.executable, "-m", "lossgen", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if check_rc is not None:
        assert result.returncode == check_rc, output
    return result.returncode, output


def spec_text(name, expr="scale**2*log1p(((p - y)/scale)**2/2)", extra=""):
    """A small valid spec, written here by hand (independent of `lossgen new`'s template)."""
    return (f'name = "{name}"\n'
            f'title = "Test loss {name}"\n{extra}'
            '\n[inputs]\ny = { role = "target" }\np = { role = "prediction" }\n'
            '\n[params]\nscale = { default = 1.5, domain = "positive" }\n'
            f'\n[loss]\nexpr = "{expr}"\n')


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict:
    """Every plain file of ``folder``: its bytes and modification time, to prove nothing moved."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """specs/ with two losses, generated once into out/; tests work on copies of it."""
    root = tmp_path_factory.mktemp("base")
    write(root / "specs" / "custom" / "first.toml", spec_text("first"))
    write(root / "specs" / "other" / "second.toml", spec_text("second", expr="(p - y)**2/scale"))
    run_cli("generate", "--specs", "specs", "--out", "out", cwd=root, check_rc=0)
    return root


@pytest.fixture
def project(base_project, tmp_path):
    """A private copy of the base project (file times preserved), as the current folder."""
    root = tmp_path / "project"
    shutil.copytree(base_project, root)
    return root


# --- new, generate, load ---------------------------------------------------------------------

def test_new_generate_load_and_finite_difference(tmp_path):
    rc, output = run_cli("new", "my_loss", "--specs", "myspecs", cwd=tmp_path)
    assert rc == 0, output
    spec = tmp_path / "myspecs" / "custom" / "my_loss.toml"
    assert spec.is_file()
    assert "my_loss.toml" in output

    rc, output = run_cli("generate", "--specs", "myspecs", "--out", "out", cwd=tmp_path)
    assert rc == 0, output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "my_loss.py"]
    # a progress line names the spec and the time it took
    assert re.search(r"\[1/1\] custom/my_loss\.toml\s+\d+\.\d+ s", output), output

    # files are created with the mode any other new file gets here (umask), not 0600
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for name in ("my_loss.py", "__init__.py"):
        assert stat.S_IMODE((out / name).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)

    catalog = lossgen.load(out)
    assert catalog.available() == ["my_loss"]
    loss = catalog.get("my_loss")
    assert len(loss.predictions) == 1
    prediction = loss.predictions[0]

    rng = np.random.default_rng(0)
    arrays = {name: rng.uniform(0.3, 2.0, size=64) for name in loss.inputs}
    x = arrays[prediction]
    h = 1e-6 * np.maximum(1.0, np.abs(x))

    def at(value):
        return loss.loss_grad_hess(**dict(arrays, **{prediction: value}))

    l_plus, g_plus, _ = at(x + h)
    l_minus, g_minus, _ = at(x - h)
    _, grad, hess = at(x)
    fd_grad = (l_plus - l_minus) / (2 * h)
    fd_hess = (g_plus - g_minus) / (2 * h)
    assert np.any(np.abs(fd_grad) > 1e-2) and np.any(np.abs(fd_hess) > 1e-2)  # not trivially zero
    np.testing.assert_allclose(grad, fd_grad, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(hess, fd_hess, rtol=1e-5, atol=1e-7)


def test_new_refuses_to_overwrite(tmp_path):
    run_cli("new", "my_loss", "--specs", "specs", cwd=tmp_path, check_rc=0)
    spec = tmp_path / "specs" / "custom" / "my_loss.toml"
    spec.write_text("# my own edits\n", encoding="utf-8")
    rc, output = run_cli("new", "my_loss", "--specs", "specs", cwd=tmp_path)
    assert rc != 0
    assert "already exists" in output and "my_loss.toml" in output
    assert spec.read_text(encoding="utf-8") == "# my own edits\n"


@pytest.mark.parametrize("name, reason", [("lambda", "keyword"), ("my-loss", "not a valid identifier")])
def test_new_rejects_invalid_name(tmp_path, name, reason):
    rc, output = run_cli("new", name, "--specs", "specs", cwd=tmp_path)
    assert rc != 0
    assert reason in output and name in output
    assert "Traceback" not in output
    assert not (tmp_path / "specs").exists() or not any((tmp_path / "specs").rglob("*.toml"))


# --- generate --check, stale and orphaned files ----------------------------------------------

def test_check_current_then_stale_after_edit_and_delete(project):
    out = project / "out"
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", "--check", cwd=project)
    assert rc == 0, output
    assert "up to date" in output

    # an edit, even one that changes only the spec's bytes: the module records the spec's hash
    first = project / "specs" / "custom" / "first.toml"
    first.write_text(first.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    # a deleted spec: its module is orphaned
    (project / "specs" / "other" / "second.toml").unlink()
    before = snapshot(out)
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", "--check", cwd=project)
    assert rc == 1, output
    stale_lines = [line for line in output.splitlines() if "stale" in line]
    assert any("first.py" in line for line in stale_lines), output
    assert any("second.py" in line for line in stale_lines), output
    assert snapshot(out) == before  # --check writes nothing

    # a hand-written file without the marker, and one that merely mentions it in its code
    write(out / "helper.py", "def helper():\n    return 1\n")
    write(out / "notes.py", f"x = 1\n{MARKER}\n")
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", cwd=project)
    assert rc == 0, output
    assert not (out / "second.py").exists()
    assert (out / "helper.py").read_text() == "def helper():\n    return 1\n"
    assert (out / "notes.py").read_text() == f"x = 1\n{MARKER}\n"
    assert sorted(p.name for p in out.glob("*.py")) == ["__init__.py", "first.py", "helper.py", "notes.py"]
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", "--check", cwd=project)
    assert rc == 0, output


def test_spec_error_leaves_output_untouched(project):
    out = project / "out"
    write(out / "helper.py", "HAND_WRITTEN = True\n")
    # a change that a non-transactional generator would write before meeting the broken spec
    first = project / "specs" / "custom" / "first.toml"
    first.write_text(first.read_text(encoding="utf-8").replace("1.5", "2.5"), encoding="utf-8")
    broken = write(project / "specs" / "zzz" / "broken.toml", spec_text("broken", expr="expp(p - y)"))
    before = snapshot(out)

    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", cwd=project)
    assert rc == 1
    assert "broken.toml" in output and "[loss] expr" in output and "did you mean 'exp'" in output
    assert "Traceback" not in output
    assert snapshot(out) == before  # same files (no temporary left behind), same bytes, same times

    broken.unlink()
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", cwd=project)
    assert rc == 0, output
    assert (out / "first.py").read_bytes() != before["first.py"][0]
    assert (out / "helper.py").read_text() == "HAND_WRITTEN = True\n"


def test_hand_written_file_with_a_spec_name_is_not_overwritten(project):
    out = project / "out"
    write(out / "first.py", "# my own module\nVALUE = 1\n")
    before = snapshot(out)
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", cwd=project)
    assert rc == 1
    assert "first.py" in output and "not written by lossgen" in output
    assert snapshot(out) == before


def test_long_docstring_module_is_still_recognised_as_generated(tmp_path):
    """A spec with many references pushes the marker far down the module's docstring; the
    module is still lossgen's: regenerated after an edit, removed when its spec goes."""
    references = "references = [" + ", ".join(f'"Reference {i}"' for i in range(60)) + "]\n"
    spec = write(tmp_path / "specs" / "custom" / "cited.toml", spec_text("cited", extra=references))
    write(tmp_path / "specs" / "custom" / "first.toml", spec_text("first"))
    run_cli("generate", "--specs", "specs", "--out", "out", cwd=tmp_path, check_rc=0)
    module = tmp_path / "out" / "cited.py"
    lines = module.read_text().splitlines()
    assert next(i for i, line in enumerate(lines) if line.startswith(MARKER)) > 40  # the premise

    spec.write_text(spec.read_text().replace("Reference 59", "Reference 61"), encoding="utf-8")
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", cwd=tmp_path)
    assert rc == 0, output
    assert "Reference 61" in module.read_text()

    spec.unlink()
    rc, output = run_cli("generate", "--specs", "specs", "--out", "out", cwd=tmp_path)
    assert rc == 0, output
    assert not module.exists()


# --- determinism and the committed catalog ---------------------------------------------------

# the specs whose derivation and stabilisation exercise the most machinery (splits, inversion,
# Hessians from two gradients, exact sums, Piecewise): the whole catalog is checked by
# test_committed_generated_folder_is_current, whose files came from other processes
DETERMINISM_SPECS = ["robust/huber", "robust/barron", "robust/cauchy",
                     "classification/focal_binary",  # and its kernels specialised at defaults
                     "preference/dpo", "preference/ppo_clip_log",
                     "classification/binary_cross_entropy_logits"]  # and its kernels specialised at defaults


def test_generate_is_deterministic_across_hash_seeds(tmp_path):
    specs = tmp_path / "specs"
    for relative in DETERMINISM_SPECS:
        (specs / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_SPECS / f"{relative}.toml", specs / f"{relative}.toml")
    runs = {}
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        runs[seed] = subprocess.Popen(
            [sys.executable, "-m", "lossgen", "generate", "--specs", str(specs), "--out", f"out{seed}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for seed, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    first, second = (tmp_path / "out1"), (tmp_path / "out12345")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {f"{r.split('/')[1]}.py" for r in DETERMINISM_SPECS} | {
        "__init__.py", "_binary_cross_entropy_logits_defaults.py", "_focal_binary_defaults.py"} == set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        if name != "__init__.py":  # and equal to the committed module, generated with the catalog
            assert (first / name).read_bytes() == (REPO / "generated" / name).read_bytes(), name


def test_committed_generated_folder_is_current(tmp_path):
    rc, output = run_cli("generate", "--check", cwd=tmp_path)
    assert rc == 0, output
    assert "up to date" in output


# --- list, show, verify ----------------------------------------------------------------------

def test_list_prints_every_catalog_name(tmp_path):
    rc, output = run_cli("list", cwd=tmp_path)
    assert rc == 0, output
    listed = {line.split()[1] for line in output.splitlines() if line.strip()}
    assert set(CATALOG) <= listed


def test_show_huber(tmp_path):
    rc, output = run_cli("show", "huber", cwd=tmp_path)
    assert rc == 0, output
    assert "huber" in output
    assert "loss =" in output and "d loss / d p =" in output and "d2 loss / d p2 =" in output
    gradient = output.split("d loss / d p =")[1].split("d2 loss / d p2 =")[0]
    assert "delta" in gradient and "sign" in gradient


def test_show_unknown_name_fails_clearly(tmp_path):
    rc, output = run_cli("show", "nope", cwd=tmp_path)
    assert rc != 0
    assert "no spec named 'nope'" in output
    assert "Traceback" not in output


def test_show_broken_spec_fails_clearly(tmp_path):
    write(tmp_path / "specs" / "custom" / "broken.toml", spec_text("broken", expr="expp(p - y)"))
    rc, output = run_cli("show", "broken", "--specs", "specs", cwd=tmp_path)
    assert rc == 1
    assert "broken.toml" in output and "[loss] expr" in output and "column 1" in output
    assert "Traceback" not in output


def test_verify_mse(tmp_path):
    rc, output = run_cli("verify", "mse", cwd=tmp_path)
    assert rc == 0, output
    assert "max rel err" in output
    assert re.search(r"^mse\s+loss\s", output, re.MULTILINE), output


def test_verify_reports_a_known_gap_apart(monkeypatch, capsys):
    """Values inside a known gap (lossgen/known_gaps.py) are reported on lines of their own,
    counted apart, and the exit status stays 0. The table is empty since global SSIM's full
    Hessian closed the last gap (lossgen/double_word.py; poly1's, cosine_proximity's and
    cosine_embedding's before it), so a gap is registered here: every off-diagonal entry of
    ssim_global's full Hessian, at C = 2 alone (--sizes: no other size is checked)."""
    from lossgen import cli, known_gaps

    def every_entry(output, point, entry):
        return output.startswith("hess_full") and entry[0] != entry[1]
    monkeypatch.setitem(known_gaps.ROW_KNOWN_GAPS, "ssim_global", (every_entry, "registered by this test"))
    rc = cli.main(["verify", "ssim_global", "--sizes", "2"])
    output = capsys.readouterr().out
    assert rc == 0, output
    assert re.search(r"^ssim_global\s+loss C=2\s", output, re.MULTILINE) and "C=3" not in output and "C=1 " not in output
    assert re.search(r"^ssim_global\s+hess_full\[x,x\] known gap C=2 ", output, re.MULTILINE), output
    assert re.search(r"^ssim_global\s+hess_full\[x,x\] C=2 ", output, re.MULTILINE), output  # the diagonal
    assert "FAIL" not in output
    assert re.search(r"^1 more in known gaps .*, 0 of them beyond it$", output, re.MULTILINE), output


@pytest.mark.parametrize("sizes", ["0,2", "a", "", "2,,3"])
def test_verify_rejects_bad_sizes(tmp_path, sizes):
    rc, output = run_cli("verify", "dice", "--sizes", sizes, cwd=tmp_path)
    assert rc != 0 and "--sizes" in output and "positive integers" in output and "Traceback" not in output


def test_new_rejects_a_family_outside_the_spec_folder(tmp_path):
    rc, output = run_cli("new", "fine_name", "--family", "../elsewhere", "--specs", "specs", cwd=tmp_path)
    assert rc != 0 and "family" in output and "Traceback" not in output
    assert not any(tmp_path.rglob("*.toml"))


def test_verify_stress_grid_and_derivatives(tmp_path):
    rc, output = run_cli("verify", "huber", "--stress", "--derivatives", "--points", "40", cwd=tmp_path)
    assert rc == 0, output
    assert "grad[p] vs finite differences" in output
    # the stress grid adds the extreme points: 21 x 21 combinations per parameter set and more
    loss_points = int(re.search(r"^huber\s+loss\s+(\d+)", output, re.MULTILINE).group(1))
    assert loss_points > 2 * 21 * 21
