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
