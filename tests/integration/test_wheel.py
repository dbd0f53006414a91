"""The built wheel (what the Docker image installs) runs the generated-artifact checks on its own.

The wheel is built from a copy of exactly what the Dockerfile copies, installed without dependencies into a
fresh venv (the dependencies come from the test venv's site-packages, not the checkout), and `posfleet rules
check` / `posfleet dashboards check` run from a directory outside the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# What the Dockerfile's build stage copies (keep in step with it).
BUILD_INPUTS = ("pyproject.toml", "README.md", "collector", "exporters", "alert_rules", "dashboards", "docs/runbooks")


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the built posfleet wheel installed; returns its bin directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        target = src / name
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)], tmp)
    [wheel] = sorted((tmp / "dist").glob("posfleet-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    # Dependencies only: a plain path entry, so the test venv's editable-install hook for posfleet is not run.
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp)
    where = run([str(py), "-c", "import collector, exporters; print(collector.__file__, exporters.__file__)"], tmp)
    assert all(p.startswith(str(site)) for p in where.stdout.split()), where.stdout  # not the checkout's
    return venv / "bin"


def test_rules_check_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    out = run([str(installed / "posfleet"), "rules", "check"], tmp_path).stdout
    assert "is up to date" in out and "every one with a runbook" in out
    assert str(ROOT) not in out  # it checked the shipped copy, not the repository's


def test_dashboards_check_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    run([str(installed / "posfleet"), "dashboards", "check"], tmp_path)


def test_the_installed_support_page_is_served_from_package_data(installed: Path, tmp_path: Path) -> None:
    code = "from collector.support.routes import _static_bytes; print(len(_static_bytes('index.html')))"
    assert int(run([str(installed / "python"), "-c", code], tmp_path).stdout) > 0


def test_the_dockerfile_builds_the_wheel_from_the_same_inputs() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    build_stage = text.split("FROM ", 2)[1]
    # every source of every COPY (the last word is the destination)
    copied = {src for line in build_stage.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    assert copied == set(BUILD_INPUTS)
