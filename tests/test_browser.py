"""One real-browser test of the token explorer: JupyterLab on 127.0.0.1 + headless Debian
chromium driven by Playwright. Opens a copy of notebooks/05_token_explorer.ipynb (tiny jets, a
tiny untrained tokenizer), runs all cells, drags the token slider and checks that the rendered
plot changed. Skipped, saying why, when chromium or playwright is missing (``make browser``
installs chromium)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "05_token_explorer.ipynb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
K = 16


def _require_browser():
    if not Path(CHROMIUM).is_file():
        msg = f"{CHROMIUM} not found: install Debian's chromium (make browser) to run the browser test"
        print(msg)
        pytest.skip(msg)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        pytest.skip(f"playwright not importable: {err}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_inputs(root: Path) -> dict:
    """A small JetClass-schema file (classes QCD and t→bqq') and an untrained tiny tokenizer."""
    import awkward as ak
    import torch
    import vector

    from omnijet_lib.data import make_jets, write_jetclass
    from omnijet_lib.tokenizers import save_tokenizer
    from conftest import randomise_
    from omnijet_lib.training.vqvae import make_tokenizer

    rng = np.random.default_rng(0)
    parts = []
    for label in (0, 8):
        counts = rng.integers(5, 25, 12)
        pt = ak.unflatten(rng.exponential(30, counts.sum()) + 1, counts)
        eta = ak.unflatten(rng.normal(0.3, 0.2, counts.sum()), counts)
        phi = ak.unflatten(rng.normal(1.0, 0.2, counts.sum()), counts)
        v = vector.zip({"pt": pt, "eta": eta, "phi": phi, "mass": pt * 0})
        parts.append(make_jets(vector.zip({"px": v.px, "py": v.py, "pz": v.pz, "E": v.E}), label))
    data = write_jetclass(root / "toy.root", ak.concatenate(parts))
    torch.manual_seed(0)
    tok = randomise_(make_tokenizer("conditional", K, hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16))
    save_tokenizer(root / "models" / f"tokenizer_conditional_{K}" / "tokenizer.safetensors", tok)
    return {"data_files": str(data), "models_dir": str(root / "models"), "figures_dir": str(root / "figures"),
            "num_codes": K, "explore_per_class": 6, "blob_samples": 20, "blob_context": 5, "snapshot_tokens": 2}


def _notebook_copy(dst: Path, params: dict) -> Path:
    """The repository notebook with the parameters overridden in an injected cell (as papermill)."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    nb.cells.insert(i + 1, cell)
    path = dst / NOTEBOOK.name
    nbformat.write(nb, path)
    return path


def _wait_for_server(url: str, proc, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer at {url} within {timeout} s")


def test_token_explorer_in_jupyterlab(tmp_path):
    _require_browser()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    nb_dir = tmp_path / "nb"
    nb_dir.mkdir()
    params = _toy_inputs(tmp_path)
    nb_path = _notebook_copy(nb_dir, params)
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nb_dir}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                               # CI containers run as root
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(cmd, cwd=nb_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            t0 = time.monotonic()

            def step(msg):
                print(f"[browser test {time.monotonic() - t0:5.1f} s] {msg}", flush=True)

            try:
                step("open JupyterLab")
                page.goto(f"{base}/lab/tree/{nb_path.name}?token={token}", timeout=60_000)
                page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=60_000)
                try:  # a fresh JupyterLab may ask which kernel to start
                    page.locator(".jp-Dialog .jp-mod-accept").click(timeout=8_000)
                    step("kernel selected in the dialog")
                except PlaywrightTimeout:
                    pass
                page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for(timeout=60_000)
                step("run all cells")
                page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")  # no await
                page.locator(".jp-OutputArea-output", has_text="snapshot files:").wait_for(timeout=90_000)
                step("notebook ran")
                img = page.locator("img.widget-image").first
                img.wait_for(timeout=30_000)
                img.scroll_into_view_if_needed()
                src0, shot0 = img.get_attribute("src"), img.screenshot()
                slider = page.locator(".widget-slider").first
                assert "token" in slider.inner_text()
                handle = slider.locator(".noUi-handle").first
                box = handle.bounding_box()
                page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                page.mouse.down()
                page.mouse.move(box["x"] + 150, box["y"] + box["height"] / 2, steps=5)
                page.mouse.up()
                step("slider moved")
                page.wait_for_function("s => document.querySelector('img.widget-image').src !== s", arg=src0,
                                       timeout=30_000)
                shot1 = img.screenshot()
                page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
                assert img.get_attribute("src") != src0
                assert shot1 != shot0                                 # the rendered plot changed
                assert (tmp_path / "explorer.png").stat().st_size > 10_000
                assert (tmp_path / "figures" / "05_token_explorer.png").is_file()
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        if server.poll() is None:                                # our server's process group only
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
        shutil.rmtree(tmp_path / "runtime", ignore_errors=True)
