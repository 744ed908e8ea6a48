#!/usr/bin/env python3
"""Set-up and run in one step: `python3 run.py demo` runs the main job, `python3 run.py test` the tests.

Creates ./.venv on first use (or when pyproject.toml changes) with nothing but the Python on PATH.
`test` first starts (or, as root with apt-get, installs) what the suite talks to: Redis, PostgreSQL,
chromium + chromium-driver, Orthanc + its DICOMweb plugin and dcmtk; it names what will be skipped
before pytest runs. `test-setup` does only that (`.ci/run` calls it). `lint` runs ruff (lint and format
check) and mypy from the virtual environment, as configured in pyproject.toml. Any other command is a
`lungcam` subcommand.

Exit codes: pytest's for `test` (0 passed, 1 some failed, 2 interrupted or usage, 5 no tests
collected), 1 for `lint` when any check fails, `lungcam`'s for the others, 0 for `test-setup` (it
reports, it does not fail).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LUNGCAM_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".lungcam-installed"

# Where the tests find Orthanc's DICOMweb plugin (tests/helpers.pacs.PLUGIN_DIRS).
ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")


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


# --- what the test suite needs on this machine ------------------------------------------------------


def _say(message: str) -> None:
    print(f"run.py: {message}", flush=True)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(port: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _listening(port):
            return True
        time.sleep(0.2)
    return False


def _quiet(command: list[str]) -> bool:
    """Run a set-up command; True when it succeeded (its output is shown only when it failed)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        _say(f"{' '.join(command[:3])}... could not run: {exc}")
        return False
    if done.returncode != 0:
        _say(f"{' '.join(command[:4])}... exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.returncode == 0


_apt_updated = False


def _apt_install(packages: list[str]) -> bool:
    """Install Debian packages when this process may (root, apt-get present); False when it cannot or failed."""
    global _apt_updated
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return False
    _say(f"installing {' '.join(packages)} (apt-get)")
    if not _apt_updated:
        _apt_updated = _quiet(["apt-get", "update", "-qq"])
    env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
    return _quiet([*env_prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages])


def _start_redis() -> bool:
    if _listening(6379):
        return True
    if not shutil.which("redis-server") and not _apt_install(["redis-server"]):
        return False
    _say("starting Redis on 127.0.0.1:6379")
    _quiet(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
    )
    return _wait_listening(6379)


def _start_postgres() -> bool:
    if _listening(5432):
        return True
    if not shutil.which("pg_ctlcluster") and not _apt_install(["postgresql"]):
        return False
    clusters = sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    if not clusters:
        return False
    _say("starting PostgreSQL on 127.0.0.1:5432")
    _quiet(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1].parent.name, "main", "start"])
    return _wait_listening(5432)


def _orthanc_ready() -> bool:
    return bool(shutil.which("Orthanc")) and any(Path(d, "libOrthancDicomWeb.so").exists() for d in ORTHANC_PLUGIN_DIRS)


def _compose_v2() -> bool:
    """`docker compose`, or a standalone v2 `docker-compose` (what tests/test_deploy.compose_cli accepts)."""
    for command in (["docker", "compose", "version"], ["docker-compose", "version", "--short"]):
        if shutil.which(command[0]):
            probe = subprocess.run(command, capture_output=True, text=True, timeout=60)
            if probe.returncode == 0 and (command[0] == "docker" or probe.stdout.strip().lstrip("v").startswith("2")):
                return True
    return False


@dataclass
class Need:
    """One thing the suite talks to: how to check it, how to provide it, and what skips without it."""

    name: str
    present: object  # () -> bool
    provide: object  # () -> bool, tried when absent
    without: str


def _tools(*names: str) -> object:
    return lambda: all(shutil.which(name) for name in names)


NEEDS = (
    Need(
        "Redis on 127.0.0.1:6379", lambda: _listening(6379), _start_redis, "most tests FAIL (they need a real broker)"
    ),
    Need(
        "PostgreSQL on 127.0.0.1:5432 (database `test`, or LUNGCAM_TEST_POSTGRES_URL)",
        lambda: bool(os.environ.get("LUNGCAM_TEST_POSTGRES_URL")) or _listening(5432),
        _start_postgres,
        "every PostgreSQL variant of the db_url tests skips (fails with LUNGCAM_TEST_REQUIRE_POSTGRES=1)",
    ),
    Need(
        "chromium + chromedriver (Debian: chromium, chromium-driver)",
        _tools("chromium", "chromedriver"),
        lambda: _apt_install(["chromium", "chromium-driver"]) and _tools("chromium", "chromedriver")(),
        "the HTML report tests in a browser skip (tests/worker/ops/test_report.py, tests/worker/ops/test_cli.py)",
    ),
    Need(
        "Orthanc + DICOMweb plugin (Debian: orthanc, orthanc-dicomweb)",
        _orthanc_ready,
        lambda: _apt_install(["orthanc", "orthanc-dicomweb"]) and _orthanc_ready(),
        "the PACS tests that run Orthanc skip (tests/worker/pacs/test_pacs.py)",
    ),
    Need(
        "dcmtk's storescu (Debian: dcmtk)",
        _tools("storescu"),
        lambda: _apt_install(["dcmtk"]) and _tools("storescu")(),
        "the PACS tests that send with storescu skip (tests/worker/pacs/test_pacs.py)",
    ),
    Need(
        "docker compose (the Compose v2 plugin)",
        lambda: _compose_v2(),
        lambda: False,
        "the `docker compose config` check of the compose file skips (tests/test_deploy.py)",
    ),
)


def prepare_test_machine() -> list[str]:
    """Start or install what the suite needs where this process can; return what will be skipped or fail."""
    missing = []
    for need in NEEDS:
        if need.present() or need.provide():  # type: ignore[operator]
            continue
        missing.append(f"{need.name} is missing: {need.without}")
    if missing:
        _say("this machine lacks what some tests need (install as root, or see README 'Tests'):")
        for line in missing:
            _say(f"  - {line}")
    return missing


# Most of the suite's time is spent waiting on other processes (workers starting TensorFlow, leases
# expiring, a feed of scans), not computing: two pytest processes, each running whole modules
# (each module keeps its workers and fixtures; the second process gets a Redis server of its own,
# tests/conftest.py), finish in about half the time.
TEST_PROCESSES = 2


def parallel_args(pytest_args: list[str]) -> list[str]:
    """`-n 2 --dist loadfile` (pytest-xdist) unless the caller chose, or asked for a single test or module."""
    chosen = any(
        arg in ("-n", "--numprocesses", "-p") or arg.startswith(("-n", "--numprocesses", "--dist"))
        for arg in pytest_args
    )
    targets = [arg for arg in pytest_args if not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()]
    if chosen or len(targets) == 1 or os.environ.get("LUNGCAM_TEST_PROCESSES") == "1":
        return []
    if not any(VENV.glob("lib/python*/site-packages/xdist")) and not (VENV / "Lib/site-packages/xdist").exists():
        _say("pytest-xdist is not installed in the virtual environment: the tests run in one process")
        return []
    processes = os.environ.get("LUNGCAM_TEST_PROCESSES", str(TEST_PROCESSES))
    return ["-n", processes, "--dist", "loadfile"]


# What `lint` runs, each with its settings from pyproject.toml (mypy's `files` say what it checks).
LINT_CHECKS = (
    ("ruff", "check", "."),
    ("ruff", "format", "--check", "."),
    ("mypy",),
)


def lint() -> int:
    """Run every check of LINT_CHECKS from the virtual environment (all of them, even after a failure); 0 if all pass."""
    failed = []
    for check in LINT_CHECKS:
        _say(" ".join(check))
        if subprocess.call([str(BIN / check[0]), *check[1:]], cwd=ROOT) != 0:
            failed.append(" ".join(check))
    if failed:
        _say(f"lint failed: {'; '.join(failed)}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    """Dispatch `demo [args]`, `test [pytest args]`, `test-setup`, `lint`, or any `lungcam` subcommand."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "test-setup":
        prepare_test_machine()
        return 0
    if command == "test":
        prepare_test_machine()
    ensure_environment()
    if command == "lint":
        return lint()
    if command == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", *parallel_args(rest), *rest], cwd=ROOT)
    return subprocess.call([str(BIN / "lungcam"), command, *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
