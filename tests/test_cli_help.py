"""The commands' help: what demo and screen do, their defaults and exit codes (fast; no services)."""

from __future__ import annotations

import pytest

from worker.cli import build_parser


@pytest.mark.parametrize("command", ["demo", "screen"])
def test_demo_and_screen_help_say_what_they_do_defaults_and_exit_codes(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "results table" in text and "HTML report" in text and "stops everything" in text
    assert "(default: 1800.0)" in text and "(default: auto)" in text
    assert ("(default: 24)" in text) == (command == "demo")
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "4 finished, but some scans failed" in text
