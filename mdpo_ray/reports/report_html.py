"""The sweep report as one self-contained HTML page: the file to open in the MLflow UI.

MLflow's artifact view shows Markdown as plain text, so trials.md's images are link text there and its
wide table runs off the side. It previews HTML in a sandboxed iframe instead, so this page carries its
plots inside it (base64 data URIs: relative links would not resolve from the iframe) and scrolls its
table within its own box. No scripts and no external assets, so the page also opens from disk.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 16px; color: #222; }
.table { overflow: auto; max-height: 70vh; border: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: #f4f4f4; }
td:nth-child(-n+4), th:nth-child(-n+4) { text-align: left; }
img { max-width: 100%; display: block; margin: 16px 0; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def write_html(path: Path, sweep_name: str, parent_run_id: str, metric: str, mode: str, keys: list[str],
               table: pd.DataFrame, best, plots: list[Path], fmt) -> Path:
    """Write the page to path: the same title, best trial, table and plots as trials.md. fmt is report's
    cell formatter, so both files show numbers alike."""
    e = html.escape
    counts = ", ".join(f"{n} {s.lower()}" for s, n in table["status"].value_counts().items())
    if best is None:
        summary = f"No FINISHED trial has logged <code>{e(metric)}</code> yet."
    else:
        overrides = ", ".join(f"<code>{e(k)}={e(fmt(best[k]))}</code>" for k in keys) or "no overrides"
        summary = (f"<b>Best trial: <code>{e(str(best['trial_id']))}</code></b> ({e(str(best['run_name']))}): "
                   f"<code>{e(metric)}</code> = {e(fmt(best[metric]))} with {overrides}.")
    # to_html escapes every cell and header; fmt and na_rep format them as trials.md does.
    rows = table.to_html(index=False, border=0, na_rep="", formatters={c: fmt for c in table.columns})
    images = [f'<img alt="{e(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
              for p in plots]
    body = [f"<h1>Sweep <code>{e(sweep_name)}</code></h1>",
            (f"<p>Parent run <code>{e(parent_run_id)}</code>; {len(table)} trials ({e(counts)}); "
             f"metric <code>{e(metric)}</code> ({e(mode)}).</p>"),
            f"<p>{summary}</p>",
            "<p>Rows are sorted by the final value of the metric, best first; empty cells were not logged.</p>",
            f'<div class="table">{rows}</div>', *images]
    path.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                    f"<title>Sweep {e(sweep_name)}</title><style>{STYLE}</style></head>\n<body>\n"
                    + "\n".join(body) + "\n</body></html>\n", encoding="utf-8")
    return path
