"""fedsim as a package: a built wheel carries its configs and runs from any folder."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """fedsim's wheel, built offline from this checkout with the environment's setuptools."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (built,) = out.glob("fedsim-*.whl")
    return built


def test_a_wheel_installed_in_a_fresh_venv_runs_from_an_empty_folder(wheel, tmp_path):
    """No checkout: the fresh venv holds only the wheel (its dependencies are the test
    environment's, reached through a path file, which does not run the checkout's
    editable-install hook)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uv = Path(sys.executable).with_name("uv")  # installs for the fresh venv's python
    subprocess.run([str(uv), "pip", "install", "--quiet", "--no-deps", "--offline",
                    "--python", str(python), str(wheel)], check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import fedsim; print(fedsim.__file__)"],
                           cwd=empty, env=env, check=True, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    run = subprocess.run([str(venv / "bin" / "fedsim"), "num_rounds=1", "num_clients=4",
                          "clients_per_round=2", "evaluation.clients_per_round=2", "logger=none",
                          "progress=false",
                          "model=mlp", "client.local_epochs=1"],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (summary,) = empty.glob("outputs/*/*/summary.json")
    assert '"final_server_accuracy"' in summary.read_text()
