"""A report in one of its formats: the terminal table, CSV, JSON or the HTML page."""
from __future__ import annotations

from ..errors import one_of
from .html import to_html
from .tables import format_table, to_csv, to_json

FORMATS = ("table", "csv", "json", "html")


def render(result, fmt: str = "table", trial: int | None = None) -> str:
    """The report in one of FORMATS; `trial` picks the model whose per-layer costs the HTML report shows."""
    if fmt not in FORMATS:
        raise one_of("report format", fmt, FORMATS)
    if fmt == "html":
        return to_html(result, trial)
    return {"table": format_table, "csv": to_csv, "json": to_json}[fmt](result)
