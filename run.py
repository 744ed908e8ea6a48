#!/usr/bin/env python3
"""Set-up and run in one step: `python3 run.py demo` runs the main job, `python3 run.py test` the tests.

Creates ./.venv on first use (or when pyproject.toml changes) with nothing but the Python on PATH.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LUNGCAM_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".lungcam-installed"


def ensure_environment() -> None:
    """Create the virtual environment and install the project with its test extras, if needed."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    print("installing lungcam and its dependencies (first run takes a few minutes)", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    """Dispatch `demo [args]`, `test [pytest args]`, or any `lungcam` subcommand."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", *rest], cwd=ROOT)
    return subprocess.call([str(BIN / "lungcam"), command, *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
