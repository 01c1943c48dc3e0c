"""pyproject.toml and environment.yml describe the same environment."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _split(req: str) -> tuple[str, str]:
    """``"numpy>=1.24"`` -> ``("numpy", ">=1.24")``; names normalised as pip does."""
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_pyproject_and_environment_agree():
    pp = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip_side = dict(_split(r) for r in pp["dependencies"] + pp["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda_side = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            conda_side.update(_split(r) for r in dep["pip"])
        elif _split(dep)[0] not in ("python", "pip"):
            conda_side.update([_split(dep)])
    assert pip_side == conda_side


def test_pins_that_matter():
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text and '"pythia8mc==8.317.2"' in text
