"""Every module imports (catches a NameError at import time, torchtune-style); ampo/ stays free of prefect."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import ampo

MODULES = sorted(m.name for m in pkgutil.walk_packages(ampo.__path__, "ampo."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_ampo_never_imports_prefect():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not bad, f'ampo imported prefect: {bad[:3]}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_import_contracts_hold():
    """The layers, the ban on prefect/flows/tasks in ampo and the no-cycle rule of pyproject's [tool.importlinter]."""
    from pathlib import Path

    lint = Path(sys.executable).with_name("lint-imports")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([str(lint), "--no-cache"], check=False, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout
