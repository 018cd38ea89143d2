"""Showing results: is this a notebook, and tables of row dicts as HTML, markdown or text.

Pure helpers for the callbacks that show things (ProgressBar, ShowGraph, SamplePredictions); nothing here imports
IPython unless a notebook is running."""
from __future__ import annotations

import html
import math
import sys
from typing import Any

__all__ = ["NotebookDisplay", "cell", "html_table", "in_notebook", "markdown_table", "text_table"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython `ZMQInteractiveShell`: Jupyter, JupyterLab, VS Code, nbclient);
    False in a terminal, a plain IPython shell or a script."""
    ipython = sys.modules.get("IPython")  # a kernel has imported it; a script never pays for the import
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def cell(value: Any) -> str:
    """One value as table text: floats to 6 decimals (4 significant digits for tiny / huge ones), the rest str."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6f}" if value == 0 or 1e-4 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def html_table(rows: list[dict], caption: str | None = None) -> str:
    """`rows` (dicts; the columns are their keys in first-seen order) as an HTML `<table>`, values escaped."""
    columns = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="looplab">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def markdown_table(rows: list[dict]) -> str:
    """`rows` as a markdown table (what TensorBoard's text plugin renders); `|` in values is escaped."""
    columns = _columns(rows)

    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"
    return "\n".join([line(columns), "|" + "---|" * len(columns),
                      *(line([cell(row.get(c, "")) for c in columns]) for row in rows)])


def text_table(rows: list[dict]) -> str:
    """`rows` as right-aligned plain-text columns."""
    columns = _columns(rows)
    table = [columns, *([cell(row.get(c, "")) for c in columns] for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table)


class NotebookDisplay:
    """One output area of a notebook cell, redrawn in place: the first `show` displays it (`display_id=True`),
    every later one updates that same output."""

    def __init__(self):
        self.handle = None

    def show(self, obj) -> None:
        """`obj`: anything IPython can display (an `IPython.display.HTML`, a `Figure`, an object with
        `_repr_html_`)."""
        from IPython.display import display
        if self.handle is None:
            self.handle = display(obj, display_id=True)
        else:
            self.handle.update(obj)

    def show_html(self, markup: str) -> None:
        from IPython.display import HTML
        self.show(HTML(markup))
