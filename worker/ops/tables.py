"""Results as rows: one per scan and model, as a plain-text table or CSV columns."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from shared.models import Prediction, Scan

RESULT_COLUMNS = (
    "scan_id",
    "status",
    "error",
    "model_name",
    "model_version",
    "label",
    "p_covid",
    "threshold",
    "overlay_key",
    "finished_at",
    "dicom_send",
    "older_model",
    "cam_note",
)
TABLE_COLUMNS = (
    "scan_id",
    "status",
    "model_name",
    "label",
    "p_covid",
    "threshold",
    "dicom_send",
    "older_model",
    "cam_note",
    "error",
)


def result_rows(scans: Iterable[Scan], current: Collection[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """One row per scan and model (one row with empty model fields for scans without predictions).

    With `current` (the batch's model versions), a prediction of any other model is marked older_model=yes.
    """
    rows = []
    for scan in scans:
        base = {
            "scan_id": scan.scan_id,
            "status": scan.status,
            "error": scan.error or "",
            "finished_at": scan.finished_at.isoformat() if scan.finished_at else "",
        }
        predictions: Sequence[Prediction | None] = scan.predictions or [None]
        for p in predictions:
            rows.append(
                {
                    **base,
                    **(
                        {
                            "model_name": p.model_name,
                            "model_version": p.model_version,
                            "label": p.label,
                            "p_covid": f"{p.p_covid:.4f}",
                            "overlay_key": p.overlay_key or "",
                            "threshold": f"{p.threshold:.4f}" if p.threshold is not None else "",
                            # DICOM results (`lungcam dicom-send`): state per destination, e.g. "sent".
                            "dicom_send": ",".join(
                                r.state
                                for r in scan.result_sends
                                if (r.model_name, r.model_version) == (p.model_name, p.model_version)
                            ),
                            "cam_note": p.cam_note or "",
                            "older_model": "yes" if current and (p.model_name, p.model_version) not in current else "",
                        }
                        if p
                        else {}
                    ),
                }
            )
    return rows


# A terminal table fits this many columns: the longest cells (error, scan id, model) are shortened
# with "…" to fit; the CSV (`lungcam results --csv`) always has the full values.
TABLE_WIDTH = 100
OPTIONAL_COLUMNS = ("dicom_send", "older_model", "cam_note", "error")
# Shrunk (the widest of them first) to fit, never below SHRINK_FLOOR characters.
SHRINKABLE = ("error", "cam_note", "scan_id", "model_name")
SHRINK_FLOOR = 12
ELLIPSIS = "…"


def format_table(rows: list[dict[str, str]], columns: Sequence[str] = TABLE_COLUMNS, width: int = TABLE_WIDTH) -> str:
    """A plain-text table of result rows, at most `width` characters a line where the shrinkable columns allow.

    dicom_send, older_model, cam_note and error appear only when some row has a value.
    """
    columns = [c for c in columns if c not in OPTIONAL_COLUMNS or any(r.get(c) for r in rows)]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    _shrink(widths, width - 2 * (len(columns) - 1))
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_fit(c, str(r.get(c, "")), widths[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _shrink(widths: dict[str, int], budget: int) -> None:
    """Narrow the shrinkable columns, the widest first, until the cells fit `budget` characters."""
    while sum(widths.values()) > budget:
        candidates = [c for c in SHRINKABLE if c in widths and widths[c] > max(SHRINK_FLOOR, len(c))]
        if not candidates:
            return
        widest = max(candidates, key=lambda c: widths[c])
        widths[widest] -= 1


def _fit(column: str, text: str, width: int) -> str:
    """text within width: an error keeps its start, an id or model name its start and end (they differ at the end)."""
    if len(text) <= width:
        return text
    if column in ("error", "cam_note"):
        return text[: width - 1] + ELLIPSIS
    head = (width - 1) // 2
    return text[:head] + ELLIPSIS + text[len(text) - (width - 1 - head) :]
