"""The reference venv the comparison scripts share ($LAZARUS_CACHE/venv-ref).

`ensure(modules, packages)` returns when every module imports; otherwise it
creates the venv, installs `packages` there with pip and re-executes the
calling script under the venv's Python. Not part of CI.
"""
import importlib
import os
import subprocess
import sys

CACHE = os.environ.get("LAZARUS_CACHE", os.path.expanduser("~/.cache/lazarus"))
VENV = os.path.join(CACHE, "venv-ref")
VENV_PYTHON = os.path.join(VENV, "bin", "python")


def ensure(modules, packages):
    try:
        for module in modules:
            importlib.import_module(module)
        return
    except ImportError:
        pass
    if os.environ.get("LAZARUS_BENCH_BOOTSTRAPPED"):
        sys.exit("the venv in " + VENV + " still lacks packages after installing them")
    if not os.path.exists(VENV_PYTHON):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    subprocess.check_call([VENV_PYTHON, "-m", "pip", "install", "-q", *packages])
    os.environ["LAZARUS_BENCH_BOOTSTRAPPED"] = "1"
    os.execv(VENV_PYTHON, [VENV_PYTHON, *sys.argv])
