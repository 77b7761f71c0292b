"""Prepare, here, what ``make device-check`` needs on the lent GPU machine (``make device-kit``).

The GPU machine has Python 3.12 with torch (CUDA), transformers, pytest and their usual company, and
no network. It lacks the quantization libraries, so they travel as wheels in ``.whl/`` (at the
versions this checkout's ``.venv`` runs, so that the GPU check tests what CI tests):

- binary wheels for CPython 3.12 / manylinux from PyPI: torchao, bitsandbytes (its CUDA 13 and CPU
  libraries only: the whole wheel is 43 MB, most of it libraries for other CUDA versions),
  optimum, datasets (GPTQModel imports it), dill, multiprocess and transformers;
- wheels built here: GPTQModel (pure Python), and its source-only dependencies defuser,
  device-smi, logbar, tokenicer and pypcre (a C extension, so it is built with a Python 3.12 found
  on this machine: ``--python312`` or ``python3.12`` on PATH or under ``~/.pyenv/versions``).

``.devicecarry/tokenizer`` gets SmolLM2's tokenizer, read from the bundled GGUF file (the 94 MB
model itself does not fit the 64 MiB a call may carry): the tiny test models and the ~1.2B
benchmark model are built on it there.

It ends by checking that the working tree plus the kit fit the 64 MiB limit, and prints the call.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
CARRY = REPO / ".devicecarry"
LIMIT = 64 * 2**20
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64"]
BINARY = ("torchao", "bitsandbytes", "optimum", "datasets", "dill", "multiprocess", "transformers")
SOURCE_ONLY = ("defuser", "device-smi", "logbar", "tokenicer", "pypcre")
BNB_KEEP = ("libbitsandbytes_cuda13", "libbitsandbytes_cpu")  # the GPU machine's torch is built for CUDA 13


def pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def find_python312(given: str | None) -> str:
    candidates = [given] if given else [shutil.which("python3.12"),
                                        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python")))]
    for c in candidates:
        check = [c, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"]
        if c and subprocess.run(check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return c
    sys.exit("device-kit: no Python 3.12 here to build pypcre for the GPU machine's Python 3.12: "
             "pass --python312 PATH")


def strip_bitsandbytes(wheel: Path) -> None:
    """Drop the native libraries for other CUDA versions and ROCm/XPU (pip does not check RECORD hashes)."""
    out = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = Path(info.filename).name
            if name.startswith("libbitsandbytes_") and not name.startswith(BNB_KEEP):
                continue
            dst.writestr(info, src.read(info))
    out.replace(wheel)


def tree_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python312", default=None, help="a Python 3.12 to build pypcre with")
    args = ap.parse_args()
    py312 = find_python312(args.python312)

    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir()
    platform = [a for p in PLATFORMS for a in ("--platform", p)]
    pins = [f"{name}=={version(name)}" for name in BINARY]
    print("device-kit: downloading", " ".join(pins), flush=True)
    pip(sys.executable, "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
        "--implementation", "cp", *platform, "-d", str(WHEELS), *pins)
    for wheel in WHEELS.glob("bitsandbytes-*.whl"):
        strip_bitsandbytes(wheel)
    built = [f"{name}=={version(name)}" for name in SOURCE_ONLY]
    print("device-kit: building", " ".join(built), f"with {py312}", flush=True)
    pip(py312, "wheel", "--no-deps", "-w", str(WHEELS), *built)
    print(f"device-kit: building gptqmodel=={version('gptqmodel')} (pure Python)", flush=True)
    pip(sys.executable, "wheel", "--no-deps", "-w", str(WHEELS), f"gptqmodel=={version('gptqmodel')}")

    from quantselect.engines.models import demo_gguf_path
    from transformers import AutoTokenizer

    gguf = demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    shutil.rmtree(CARRY / "tokenizer", ignore_errors=True)
    tok.save_pretrained(str(CARRY / "tokenizer"))

    sizes = {"working tree": tree_bytes(), ".whl": folder_bytes(WHEELS), ".devicecarry": folder_bytes(CARRY)}
    total = sum(sizes.values())
    for name, n in sizes.items():
        print(f"device-kit: {name:>13} {n / 2**20:6.1f} MiB")
    for wheel in sorted(WHEELS.iterdir()):
        print(f"    {wheel.name} {wheel.stat().st_size / 2**20:.1f} MiB")
    if total > LIMIT:
        sys.exit(f"device-kit: {total / 2**20:.1f} MiB would travel, over the 64 MiB a call may carry")
    print(f"device-kit: {total / 2**20:.1f} MiB in all (limit 64 MiB). On the GPU machine run, with carry "
          "['.whl', '.devicecarry'] and a timeout of 570 s:\n    bash benchmarks/device_check.sh")


if __name__ == "__main__":
    main()
