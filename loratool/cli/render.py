"""The one module that owns rich: consoles, tables, escaping, the error line and progress."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from ..container import escape

# Piped output gets a wide fixed width so tables stay one row per target in logs and files.
out = Console(markup=False, highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, markup=False, highlight=False, width=None if sys.stderr.isatty() else 200)


def fail(e) -> None:
    """Print `error: <message>` as one line on stderr and exit with the error's code."""
    msg = " ".join(str(e).split("\n"))
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()
    sys.exit(e.exit_code)


def emit_json(obj) -> None:
    """Exactly one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=str))


def table(title: str | None, columns: list[str], rows, justify=None):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify=(justify or {}).get(c, "left"), overflow="fold")
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])
    return t


def fmt_num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """A progress callback for library functions: a bar on stderr when it is a TTY and not quiet."""

    def __init__(self, description: str, total: int | None, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._p = None
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress as RP, TextColumn, TimeRemainingColumn

            self._p = RP(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                         console=err, transient=True)
            self._task = self._p.add_task(description, total=total)
            self._p.start()

    def __call__(self, advance: int = 1, **kw):
        if self._p is not None:
            self._p.update(self._task, advance=advance, **kw)

    def close(self):
        if self._p is not None:
            self._p.stop()
            self._p = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
