"""run.py: what `python3 run.py test` prepares and says before pytest runs, and how it splits the suite (fast)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import helpers
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_module():
    spec = importlib.util.spec_from_file_location("lungcam_run_script", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # defines functions only: nothing runs at import
    return module


def test_what_cannot_be_provided_is_named_with_what_skips_before_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_module()
    run.NEEDS = (
        run.Need("here", lambda: True, lambda: False, "nothing"),
        run.Need("provided", lambda: False, lambda: True, "nothing"),
        run.Need("Orthanc + DICOMweb plugin", lambda: False, lambda: False, "the PACS tests that run Orthanc skip"),
    )
    assert run.prepare_test_machine() == ["Orthanc + DICOMweb plugin is missing: the PACS tests that run Orthanc skip"]
    out = capsys.readouterr().out
    assert "Orthanc + DICOMweb plugin is missing: the PACS tests that run Orthanc skip" in out
    assert "here" not in out and "provided" not in out


def test_the_suite_runs_in_two_processes_unless_one_module_or_a_choice_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_module()
    monkeypatch.delenv("LUNGCAM_TEST_PROCESSES", raising=False)
    monkeypatch.setattr(run, "VENV", tmp_path)
    assert run.parallel_args([]) == []  # no pytest-xdist in that environment: one process, and it says so
    assert "pytest-xdist is not installed" in capsys.readouterr().out
    (tmp_path / "lib" / "python3.11" / "site-packages" / "xdist").mkdir(parents=True)
    assert run.parallel_args(["-q"]) == ["-n", "2", "--dist", "loadfile"]
    assert run.parallel_args(["-m", "not slow"]) == ["-n", "2", "--dist", "loadfile"]
    assert run.parallel_args(["tests/shared/test_db.py"]) == []
    assert run.parallel_args(["-n", "4"]) == [] and run.parallel_args(["-p", "no:xdist"]) == []
    monkeypatch.setenv("LUNGCAM_TEST_PROCESSES", "1")
    assert run.parallel_args([]) == []


def test_the_browser_skip_names_only_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    present = tmp_path / "chromium"
    present.write_text("")
    monkeypatch.setattr(helpers, "CHROMIUM", str(present))
    monkeypatch.setattr(helpers, "CHROMEDRIVER", str(tmp_path / "no-chromedriver"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped, helpers.headless_chromium():
        pass
    assert "chromedriver (chromium-driver)" in str(skipped.value) and "chromium (chromium)" not in str(skipped.value)
