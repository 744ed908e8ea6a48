"""What the terminal shows: demo/screen help (what they do, defaults, exit codes) and result tables that fit."""

from __future__ import annotations

import pytest

from worker.cli import build_parser
from worker.ops.tables import TABLE_WIDTH, format_table


@pytest.mark.parametrize("command", ["demo", "screen"])
def test_demo_and_screen_help_say_what_they_do_defaults_and_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "results table" in text and "HTML report" in text and "stops everything" in text
    assert "(default: 1800.0)" in text and "(default: auto)" in text
    assert ("(default: 24)" in text) == (command == "demo")
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "4 finished, but some scans failed" in text


def test_result_tables_fit_the_terminal_and_keep_what_tells_rows_apart() -> None:
    error = "undecodable image: truncated PNG stream (the file ends 1234 bytes before its last chunk, at offset 99)"
    rows = [
        {
            "scan_id": f"site-a-2024-03-17-ward-7-portable-chest-{index:03d}.png",
            "status": "failed" if index else "done",
            "model_name": "densenet121-covid-robust-clahe-loso",
            "label": "" if index else "covid",
            "p_covid": "" if index else "0.9312",
            "threshold": "0.4100",
            "error": error if index else "",
        }
        for index in range(3)
    ]
    lines = format_table(rows).splitlines()
    assert max(map(len, lines)) <= TABLE_WIDTH
    assert lines[0].split() == ["scan_id", "status", "model_name", "label", "p_covid", "threshold", "error"]
    ids = [line.split()[0] for line in lines[2:]]
    assert len(set(ids)) == 3 and all(i.startswith("site-a") and i.endswith(f"{n:03d}.png") for n, i in enumerate(ids))
    assert all("undecodable image" in line for line in lines[3:])  # the error's kind stays readable
    # A narrow table is left as it is.
    short = [{"scan_id": "a.png", "status": "done", "model_name": "m", "label": "normal", "p_covid": "0.1000"}]
    assert format_table(short).splitlines()[2].split() == ["a.png", "done", "m", "normal", "0.1000"]


@pytest.mark.parametrize(
    ("line", "is_error"),
    [
        ("lungcam: error: the database is unreachable (LUNGCAM_DATABASE_URL): OperationalError", True),
        ("2026-12-03 07:40:48,123 ERROR worker.consumer.main: could not load model", True),
        ("[2026-12-03 07:40:48,123: ERROR/MainProcess] consumer: Cannot connect to redis", True),
        ("ERROR:    Application startup failed. Exiting.", True),
        ("2026-12-03 07:40:48,123 CRITICAL lungcam: out of memory", True),
        ("2026-12-03 07:40:48,123 INFO worker.consumer.tasks: batch: 0 done, 1 failed (Error column says why)", False),
        ("lungcam.ops: the word Error inside a message is no error record", False),
        ("Traceback (most recent call last):", False),
    ],
)
def test_the_line_that_says_why_a_child_stopped_is_an_error_record_or_the_cli_error(line: str, is_error: bool) -> None:
    from worker.ops.demo import is_error_line

    assert is_error_line(line) is is_error
