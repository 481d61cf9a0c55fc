"""The blocks every HTML report is made of (training, evaluation, compression, drift): one stylesheet, figures
as inline PNG, tables. Self-contained pages: no file beside them, nothing fetched when they open."""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def figure_html(fig: Any) -> str:
    """A matplotlib figure as an <img> with the PNG inline; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def table_html(rows: list[list[Any]], header: list[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def format_cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}h2{margin-top:1.6em;border-bottom:1px solid #ddd}img{max-width:100%}
pre{background:#f7f7f7;padding:.8em;overflow:auto}.warn{color:#a40}"""
