"""Self-contained HTML pages: inline CSS, images as base64 data URIs, nothing fetched.

A Content-Security-Policy forbids every external request, so a page that works here works
offline, after the run folder is moved, and as an e-mail attachment. Every piece of text
from a run folder goes through ``esc`` (class names and config values are user input).
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2125; margin: 0 auto; max-width: 1280px; padding: 1.2em 1.5em 4em; }
h1 { font-size: 1.6em; margin-bottom: .1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #5c6670; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dde2; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; }
.kv td:first-child { color: #5c6670; }
.cols { display: flex; flex-wrap: wrap; gap: 1.5em; } .cols > div { flex: 1 1 320px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 0 1.5em;
        align-items: start; }
figure { margin: .4em 0 1em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #5c6670; font-size: .9em; }
.finding { border-left: 5px solid; padding: .5em .9em; margin: .6em 0; border-radius: 3px; }
.bad { border-color: #c62828; background: #fdecea; } .warn { border-color: #e09b00; background: #fff6e0; }
.good { border-color: #1a7f37; background: #e8f5ec; } .info { border-color: #8796a5; background: #f1f4f7; }
.best { font-weight: 600; background: #e8f5ec; }
.scroll { max-height: 28em; overflow: auto; display: inline-block; }
code { background: #f3f5f7; padding: 0 .25em; border-radius: 3px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, kind: str = "") -> str:
    """Numbers as people read them; None as a dash. Returns plain (unescaped) text."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "pct" and isinstance(value, (int, float)):
        return f"{value:.2%}"
    if kind == "s" and isinstance(value, (int, float)):
        return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def img(png: Path, alt: str, caption: str = "") -> str:
    if not png.exists():
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None,
          row_class: Sequence[str] | None = None) -> str:
    """Cells are plain text (escaped here); ``numeric`` right-aligns columns."""
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_class[i])}"' if row_class and row_class[i] else ""
        cells = "".join(f'<td{" class=num" if numeric[j] else ""}>{esc(c)}</td>' for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
