"""Checks of the notebook suite that do not execute the notebooks (``pytest --nbmake`` does that).

- every ``notebooks/NN_name.py`` (jupytext percent format, the source) has its ``.ipynb`` twin
  and both hold the same cells (jupytext's own reader on both sides);
- the ``.ipynb`` files are committed clean: no outputs, no execution counts;
- every notebook has its Colab badge, a Colab-only install cell, a parameters cell reading the
  environment, and no absolute paths;
- the install cell does nothing outside Colab, does the right thing inside it (with
  ``subprocess.run`` stubbed), and its pip command installs the package into a fresh virtual
  environment (slow test, see its docstring).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
NAMES = [p.stem for p in SOURCES]
EXPECTED = ["01_log_router_logits", "02_fit_null_kdes", "03_online_bh_routing", "04_alpha_explorer"]

def _sync_script():
    """``scripts/sync_colab_cells.py`` as a module: the one reader of the Colab source setting."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_colab_cells", REPO / "scripts" / "sync_colab_cells.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _install_cell(name: str) -> str:
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source]
    assert len(cells) == 1, f"{name}: expected exactly one install cell guarded by google.colab"
    return cells[0]


def _pip_args(cell: str) -> list[str]:
    """The literal ``PIP_INSTALL`` list of the install cell."""
    for node in ast.walk(ast.parse(cell)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PIP_INSTALL" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("the install cell has no literal PIP_INSTALL list")


def test_all_four_notebooks_are_present():
    assert NAMES == EXPECTED
    ipynbs = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert ipynbs == NAMES, "every .py needs its paired .ipynb and vice versa (jupytext --sync notebooks/*.py)"
    config = (NOTEBOOKS / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config


@pytest.mark.parametrize("name", EXPECTED)
def test_pair_in_sync(name):
    text = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    assert _cells(text) == _cells(notebook), (
        f"{name}.py and {name}.ipynb differ: edit the .py, then run `jupytext --sync notebooks/{name}.py`"
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_ipynb_committed_clean(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}.ipynb has outputs or execution counts in cells {dirty}; strip them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_conventions(name):
    source = (NOTEBOOKS / f"{name}.py").read_text()
    sync = _sync_script()
    # badge and install cell follow pyproject.toml [tool.bh-routing] (python scripts/sync_colab_cells.py)
    assert f"({sync.badge_url(name)})" in source, "Colab badge with the notebook's own path"
    assert sync.repo_url_line() in source.splitlines(), "install cell clones the repository set in pyproject.toml"
    assert source.count("https://github.com/") == 1, "the repository appears once, in the REPO_URL line"
    assert "nbu.check_runtime(MODEL_NAME)" in source, "the first cells say whether a GPU is there"
    assert "nbu.small_mode()" in source and "nbu.model_choice()" in source, "parameters cell reads the environment"
    # No absolute paths: nothing like "/home/...", "/content/...", "C:\\..." in string literals.
    absolute = re.findall(r"""["'](/(?!/)[A-Za-z]|[A-Za-z]:\\)""", source)
    assert not absolute, f"absolute paths in {name}.py: {absolute}"
    # No library logic in notebooks: no function or class definitions.
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defs, f"{name}.py defines {defs}: move them to bh_helpers.app.notebook or bh_helpers.app.widgets"


def test_install_cell_is_a_no_op_outside_colab(tmp_path, monkeypatch):
    cell = _install_cell(EXPECTED[0])
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append((a, k)))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    path_before = list(sys.path)
    exec(compile(cell, "install-cell", "exec"), {})
    assert calls == []
    assert Path.cwd() == tmp_path
    assert sys.path == path_before


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("cloned", [False, True])
def test_install_cell_on_colab(name, cloned, tmp_path, monkeypatch):
    """Fake ``google.colab`` and stub ``subprocess.run``: the cell clones (once), pip-installs in
    the clone, puts it on ``sys.path`` and moves into its ``notebooks/`` folder."""
    cell = _install_cell(name)
    calls = []

    def fake_run(cmd, cwd=None, **kwargs):
        calls.append((list(cmd), cwd))
        if cmd[:2] == ["git", "clone"]:
            dest = Path(cmd[-1])
            (dest / "notebooks").mkdir(parents=True)
            (dest / "pyproject.toml").write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    repo = tmp_path / "bh-routing"
    if cloned:
        (repo / "notebooks").mkdir(parents=True)
        (repo / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(cell, "install-cell", "exec"), {})
    commands = [c[0] for c in calls]
    clones = [c for c in commands if c[:2] == ["git", "clone"]]
    assert len(clones) == (0 if cloned else 1)
    pip = [c for c in calls if c[0][1:4] == ["-m", "pip", "install"]]
    assert len(pip) == 1 and Path(pip[0][1]) == repo
    assert "transformers>=5.23,<6" in pip[0][0] and ".[notebooks]" in pip[0][0]
    assert sys.path[0] == str(repo)
    assert Path.cwd() == repo / "notebooks"
    # Running the cell again from notebooks/ (Colab "Run all" twice) must not clone again.
    calls.clear()
    exec(compile(cell, "install-cell", "exec"), {})
    assert not [c for c in calls if c[0][:2] == ["git", "clone"]]


@pytest.mark.parametrize("name", EXPECTED)
def test_install_cell_with_an_unreachable_repository_says_how_to_get_in(name, tmp_path, monkeypatch, capsys):
    """A real ``git clone`` of a URL that does not exist: one message (SystemExit, which IPython shows
    without a traceback) naming the URL and the three ways in; nothing is pip-installed."""
    cell = _install_cell(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BH_ROUTING_REPO", "file:///nonexistent")
    monkeypatch.delenv("BH_ROUTING_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as stop:
        exec(compile(cell, "install-cell", "exec"), {})
    message = str(stop.value)
    assert "\n" not in message and message.startswith("Cannot install bh-routing: cloning file:///nonexistent failed")
    for way in ("set BH_ROUTING_REPO", "python -m pip wheel --no-deps -w dist .", "bh_routing-*.whl",
                "BH_ROUTING_DIR", "section 'Colab'"):
        assert way in message
    assert Path.cwd() == tmp_path and not (tmp_path / "bh-routing").exists()


def test_install_cell_installs_an_uploaded_wheel(tmp_path, monkeypatch):
    cell = _install_cell(EXPECTED[0])
    calls = []
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bh_routing-0.1.0-py3-none-any.whl").write_bytes(b"")
    monkeypatch.delenv("BH_ROUTING_DIR", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, cwd=None, **k: calls.append(list(cmd)) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(cell, "install-cell", "exec"), {})
    assert not [c for c in calls if c[:2] == ["git", "clone"]]
    assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                      f"{tmp_path / 'bh_routing-0.1.0-py3-none-any.whl'}[notebooks]", "transformers>=5.23,<6"]]
    assert Path.cwd() == tmp_path


def test_readme_opens_every_notebook_in_colab_near_the_top():
    sync = _sync_script()
    head = "\n".join((REPO / "README.md").read_text(encoding="utf-8").splitlines()[:30])
    for name in EXPECTED:
        assert f"({sync.badge_url(name)})" in head, f"README's first screen lacks the Colab badge of {name}"


def test_install_cells_are_the_one_template():
    sync = _sync_script()
    for name in EXPECTED:
        assert _install_cell(name).strip() == sync.install_cell().strip(), f"{name}: run scripts/sync_colab_cells.py"


@pytest.mark.slow
def test_install_command_in_a_fresh_venv(tmp_path):
    """The install cell's pip command, run for real in a new virtual environment.

    A truly clean venv would have to download torch and transformers (minutes, and CI has no
    network), so the new venv sees the site-packages of the environment running the tests through
    a ``.pth`` file (not ``--system-site-packages``, which exposes the BASE interpreter's packages
    when the tests run in a virtualenv: there a setuptools without ``bdist_wheel`` failed the
    build), and pip runs with ``--no-index`` (nothing may be downloaded) and
    ``--no-build-isolation`` (setuptools from the same place). What this checks:
    the exact arguments of the cell (``-e ".[notebooks]"`` plus the transformers v5 pin) parse,
    the pins and the ``notebooks`` extra resolve against the tested versions, the package builds
    and installs editable INTO THE VENV from a copy of the checkout (so the working tree is not
    touched), and ``import bh_helpers`` then works from the venv in an unrelated directory.
    """
    cell = _install_cell(EXPECTED[0])
    args = _pip_args(cell)
    assert args[:3] == ["-m", "pip", "install"]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, checkout / name)
    shutil.copytree(REPO / "bh_helpers", checkout / "bh_helpers", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    # The running environment's packages (pip, setuptools, torch, ...) after the venv's own: the same
    # in a virtualenv, a conda env and a bare system Python.
    import site

    outer = [d for d in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(d)]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "_tests_outer_env.pth").write_text("\n".join(outer) + "\n")
    cmd = [str(python), *args[:3], "--no-index", "--no-build-isolation", *args[3:]]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = (
        "import importlib.metadata as m, pathlib, sys, bh_helpers, bh_helpers.app.notebook, bh_helpers.app.widgets;"
        "d = m.distribution('bh-routing');"
        "print(pathlib.Path(bh_helpers.__file__).resolve().parent);"
        "print(pathlib.Path(d.locate_file('')).resolve())"
    )
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    package_dir, dist_location = out.stdout.split()
    assert Path(package_dir) == (checkout / "bh_helpers").resolve(), "editable install points at the copied checkout"
    assert Path(dist_location).is_relative_to(venv.resolve()), "installed into the venv, not the system"


# ----------------------------------------------------------------------------------------------
# bh_helpers.app.notebook: the pieces the notebooks lean on
# ----------------------------------------------------------------------------------------------


def test_small_mode_and_model_choice_from_environment():
    import torch

    from bh_helpers.app import notebook as nbu

    assert nbu.small_mode({"BH_NOTEBOOK_SMALL": "1"}) is True
    assert nbu.small_mode({"BH_NOTEBOOK_SMALL": "0"}) is False
    assert nbu.small_mode({}) is (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="BH_NOTEBOOK_SMALL"):
        nbu.small_mode({"BH_NOTEBOOK_SMALL": "maybe"})
    assert nbu.model_choice({}) == "auto"
    assert nbu.model_choice({"BH_MODEL": "tiny"}) == "tiny"
    assert nbu.eval_datasets(["wikitext2"], {}) == ["wikitext2"]
    assert nbu.eval_datasets(["wikitext2"], {"BH_EVAL_DATASETS": " prose, code "}) == ["prose", "code"]
    for bad in ("wikitext", ",", "prose,bogus"):  # an unknown name is refused, not dropped
        with pytest.raises(ValueError, match="BH_EVAL_DATASETS must name data sets from prose"):
            nbu.eval_datasets(["prose"], {"BH_EVAL_DATASETS": bad})

    from bh_helpers.app import paths

    assert paths.resolve_model_key("tiny") == "tiny"
    assert paths.model_slug("tiny") == "tiny-olmoe"
    assert paths.model_slug("allenai/OLMoE-1B-7B-0924") == "allenai--OLMoE-1B-7B-0924"


def test_one_model_slug_for_local_folders(tmp_path):
    """The notebooks' model_slug turned a local folder into a path with '--' for '/'; the pipeline's
    into the folder's name: the two looked for a bank in different places."""
    from bh_helpers.app import paths

    folder = tmp_path / "checkpoints" / "my-olmoe"
    folder.mkdir(parents=True)
    assert paths.model_slug(str(folder)) == "my-olmoe"
    assert paths.output_dir(str(folder), tmp_path / "outputs") == tmp_path / "outputs" / "my-olmoe"
    assert paths.default_null_bank_dir(str(folder), must_exist=False).name == "my-olmoe"


def test_router_logits_round_trip_and_sequence_split(tmp_path):
    import torch

    from bh_helpers.app import notebook as nbu
    from bh_helpers.capture import CapturedLogits, header_value, split_by_sequence

    g = torch.Generator().manual_seed(0)
    seq = torch.arange(8).repeat_interleave(5)  # 8 documents of 5 tokens
    captured = CapturedLogits(
        logits={0: torch.randn(40, 4, generator=g), 2: torch.randn(40, 4, generator=g)},
        token_ids=torch.arange(40), positions=torch.arange(5).repeat(8), sequence_index=seq, total_tokens=40,
    )
    settings = {"model_id": "tiny", "max_tokens": 4096, "window": None}
    path = captured.save(tmp_path / "x" / nbu.LOGITS_NAME, metadata=settings)
    loaded, header = CapturedLogits.load(path)
    assert {k: header[k] for k in settings} == {"model_id": "tiny", "max_tokens": "4096", "window": "null"}
    assert header["max_tokens"] == header_value(4096)
    assert header["format"] == "bh_helpers.CapturedLogits" and header["total_tokens"] == "40"
    assert loaded.layers == [0, 2] and torch.equal(loaded[2], captured[2])
    assert torch.equal(loaded.sequence_index, seq) and loaded.total_tokens == 40
    fit, held = split_by_sequence(loaded, held_out_fraction=0.25)
    assert held[0].shape[0] == 10 and fit[0].shape[0] == 30  # two whole sequences held out
    rows_held = {tuple(r) for r in held[0].tolist()}
    assert not rows_held & {tuple(r) for r in fit[0].tolist()}


@pytest.mark.fault("damaged files", "recovered")
def test_a_notebook_cache_that_cannot_be_verified_is_captured_again(tmp_path, capsys):
    """Notebooks 01/02/04 share one cached capture. One written before captures carried a checksum (or damaged
    since) stopped notebooks 01, 02 and 04 with "capture again", which a notebook user cannot do: the cache is
    the notebooks' own output, so it is captured again, with a line that says why."""
    from bh_helpers.app import notebook as nbu
    from bh_helpers.capture import CapturedLogits

    path = tmp_path / nbu.LOGITS_NAME
    first, model, tok = nbu.calibration_logits(path, model_name="tiny", max_tokens=64, window=16)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one byte of the last tensor flipped: the checksum no longer holds
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        CapturedLogits.load(path)
    again, _, _ = nbu.calibration_logits(path, model=model, tokenizer=tok, model_name="tiny", max_tokens=64, window=16)
    assert "capturing again:" in capsys.readouterr().out
    assert torch.equal(again[0], first[0]) and CapturedLogits.load(path)[0].num_tokens == first.num_tokens


def test_notebook_texts_are_balanced():
    from bh_helpers.models.loading import load_corpus_slice
    from bh_helpers.models.texts import corpus_texts

    texts = corpus_texts("calibration", 6)
    domain = {r["text"]: r["domain"] for r in load_corpus_slice("calibration")}
    assert len(texts) == 6 and [domain[t] for t in texts[:2]] == ["prose", "code"]  # alternating
    held_out = corpus_texts("evaluation", 3)
    eval_domain = {r["text"]: r["domain"] for r in load_corpus_slice("evaluation")}
    assert len(held_out) == 3 and [eval_domain[t] for t in held_out] == ["prose", "code", "prose"]
    assert not set(held_out) & set(domain)  # evaluation documents are not calibration documents
    assert corpus_texts("evaluation", domain="code") == [r["text"] for r in load_corpus_slice("evaluation", "code")]


def _tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_notebook_02_full_mode_leaves_committed_banks_byte_identical(tmp_path, monkeypatch):
    """Full mode (``BH_NOTEBOOK_SMALL=0``) fits on the whole calibration slice and saves a bank,
    but only under its output folder: every file under ``kde_models/`` keeps its bytes (before
    the fix it replaced ``kde_models/tiny-olmoe/``, 1.4 MB -> 6.0 MB)."""
    nbclient = pytest.importorskip("nbclient")
    before = _tree_digest(REPO / "bh_helpers" / "data" / "kde_models")
    assert before, "kde_models/ should hold the committed banks"
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOKS / "02_fit_null_kdes.ipynb", work)
    for var, value in {"BH_NOTEBOOK_SMALL": "0", "BH_MODEL": "tiny", "BH_THREADS": "1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("BH_UPDATE_COMMITTED_BANK", raising=False)
    nb = nbformat.read(work / "02_fit_null_kdes.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}}).execute()
    assert _tree_digest(REPO / "bh_helpers" / "data" / "kde_models") == before
    saved = work / "outputs" / "tiny-olmoe" / "null_bank" / "metadata.json"
    assert saved.is_file(), "the full-mode bank belongs under the notebook's outputs/"


def test_check_runtime_says_what_auto_means(monkeypatch):
    from bh_helpers.app import notebook as nbu

    if nbu.torch.cuda.is_available():
        pytest.skip("the CPU messages are checked on a machine without CUDA")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    text = nbu.check_runtime("auto")
    assert "No CUDA GPU" in text and "embedded tiny OLMoE" in text and "allenai/OLMoE-1B-7B-0924" in text
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert "Change runtime type > T4 GPU" in nbu.check_runtime("auto")
    assert nbu.check_runtime("tiny").endswith("Model: tiny")


def test_update_committed_bank_only_when_asked():
    from bh_helpers.app import notebook as nbu

    assert nbu.update_committed_bank({}) is False
    assert nbu.update_committed_bank({"BH_NOTEBOOK_SMALL": "0"}) is False  # full mode alone never writes there
    assert nbu.update_committed_bank({"BH_UPDATE_COMMITTED_BANK": "1"}) is True
    with pytest.raises(ValueError, match="BH_UPDATE_COMMITTED_BANK must be 1 or 0"):
        nbu.update_committed_bank({"BH_UPDATE_COMMITTED_BANK": "maybe"})
