"""The distribution as a user gets it: a wheel, installed into fresh virtualenvs.

Two venvs, built once for the module: one with the base install (what goes into
an engine process: must pull no grpc/protobuf), one with the [client] extra (must
run the committed stubs on whatever protobuf pip picks, today a newer major than
the one the stubs were generated with).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every test here starts processes (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = (
    "enginetime",
    "enginetime.v1",
    "enginetime.engine_hooks",
    "enginetime.engine_hooks.sglang",
    "enginetime.engine_hooks.vllm",
    "enginetime.sidecar",
    "enginetime.clients",
    "enginetime.testbed",
)


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, ROOT)
    (whl,) = out.glob("enginetime-*.whl")
    return whl


def _fresh_venv(where: Path) -> Path:
    venv.create(where, with_pip=True)
    return where / "bin" / "python"


def test_wheel_holds_every_subpackage_and_the_protos(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in SUBPACKAGES:
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, f"{pkg} missing from the wheel"
    assert "enginetime/v1/accounting.proto" in names
    assert "enginetime/orca/orca_pb2.py" in names  # ORCA stubs (the clients import them)
    assert (
        "enginetime/orca/proto/xds/data/orca/v3/orca_load_report.proto" in names
    )  # accounting.proto's import
    # No generic top-level import names (sidecar, clients are taken on PyPI).
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"enginetime"}


def test_base_install_is_stdlib_only(wheel: Path, tmp_path: Path) -> None:
    py = _fresh_venv(tmp_path / "base")
    _run(py, "-m", "pip", "install", "-q", wheel)
    installed = _run(py, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "grpcio" not in installed and "protobuf" not in installed and "numpy" not in installed
    probe = "from enginetime.engine_hooks import Recorder; r = Recorder('probe', start=False); r.close()"
    _run(py, "-c", probe, cwd=tmp_path)


def test_client_extra_runs_the_stubs_and_every_subpackage_imports(wheel: Path, tmp_path: Path) -> None:
    py = _fresh_venv(tmp_path / "client")
    _run(py, "-m", "pip", "install", "-q", f"{wheel}[client]")
    # The heavy extras (torch, numpy, otel) come from the dev venv, after the fresh
    # venv's own site-packages, so the wheel's copy of enginetime is the one imported.
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import importlib, enginetime, google.protobuf as pb;"
        f"mods = {SUBPACKAGES!r};"
        "[importlib.import_module(m) for m in mods];"
        "import enginetime.v1.accounting_pb2_grpc, enginetime.clients;"
        "print(enginetime.__file__); print(pb.__version__)"
    )
    where, pb_version = _run(py, "-c", probe, cwd=tmp_path).stdout.split()
    assert where.startswith(str(site)), f"imported {where}, not the installed wheel"
    assert int(pb_version.split(".")[0]) >= 6
