"""The one module that owns rich: consoles, tables, escaping, the error line and progress."""

from __future__ import annotations

import json
import sys

import click

from ..container import escape

_consoles: dict = {}


def __getattr__(name):
    """`out` and `err` are rich consoles made on first use, so plain output never imports rich."""
    if name in ("out", "err"):
        if name not in _consoles:
            from rich.console import Console

            tty = (sys.stdout if name == "out" else sys.stderr).isatty()
            # Piped output gets a wide fixed width so tables stay one row per target in logs and files.
            _consoles[name] = Console(stderr=name == "err", markup=False, highlight=False,
                                      width=None if tty else 200)
        return _consoles[name]
    raise AttributeError(name)


def write(text: str = "") -> None:
    """Print plain text (and PlainTables) on stdout, through rich only when stdout is a terminal."""
    if sys.stdout.isatty():
        __getattr__("out").print(text)
    elif isinstance(text, PlainTable):
        sys.stdout.write("\n".join(text.lines()) + "\n")
    else:
        sys.stdout.write(f"{text}\n")


def write_fields(pairs, width: int = 18) -> None:
    """`label: value` lines with the values aligned at `width`; an empty label continues the line above, and
    values (read from files) are escaped."""
    for label, value in pairs:
        head = f"{label}:" if label else ""
        write(f"{head:<{width}}{' ' if len(head) >= width else ''}{escape(str(value))}")


def printable(text: str) -> str:
    """`text` on one line with every control character escaped (\\x1b, \\n, ...): a name read from a file or
    typed by a user never reaches the terminal raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def fail(e) -> None:
    """Print `error: <message>` as one line on stderr and exit with the error's code."""
    msg = printable(str(e))
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()
    sys.exit(e.exit_code)


def emit_json(obj) -> None:
    """Exactly one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=str))


RICH_MAX_ROWS = 300  # rich lays out each cell; past this (or when piped) a plain aligned table is much faster


class PlainTable:
    """An aligned text table printed without rich's layout engine (linear time in the rows)."""

    def __init__(self, columns, rows, justify):
        self.columns, self.rows, self.justify = columns, rows, justify or {}

    def lines(self):
        widths = [max([len(c)] + [len(r[i]) for r in self.rows]) for i, c in enumerate(self.columns)]

        def fmt(cells):
            parts = [c.rjust(w) if self.justify.get(col) == "right" else c.ljust(w)
                     for c, w, col in zip(cells, widths, self.columns)]
            return "  ".join(parts).rstrip()

        yield fmt(self.columns)
        yield "  ".join("-" * w for w in widths)
        for r in self.rows:
            yield fmt(r)

    def __rich_console__(self, console, options):
        # Pre-rendered segments: rich prints them as they are, without measuring or wrapping.
        from rich.segment import Segment

        for line in self.lines():
            yield Segment(line)
            yield Segment.line()


def table(title: str | None, columns: list[str], rows, justify=None):
    rows = [[escape(str(x)) for x in r] for r in rows]
    if len(rows) > RICH_MAX_ROWS or not sys.stdout.isatty():
        return PlainTable(columns, rows, justify)
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify=(justify or {}).get(c, "left"), overflow="fold")
    for r in rows:
        t.add_row(*r)
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
                         console=__getattr__("err"), transient=True)
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


FIT_ROWS = 40  # targets shown in validate's fit table; --json lists them all


def render_validation(doc: dict) -> None:
    """`validate`'s report for people: findings table and fit table on stdout, the verdict line on stderr."""
    if doc["findings"]:
        write(table(None, ["rule", "severity", "target", "message"],
                    [(f["rule"], f["severity"], f["target"] or "-", f["message"]) for f in doc["findings"]]))
    fit = doc.get("fit")
    if fit is not None:
        rows = fit["rows"]
        shown = [(r["name"], r["base_key"] or "-", r["layout"], "x".join(map(str, r["shape"])),
                  "x".join(map(str, r["base_shape"])) if r["base_shape"] else "-", "yes" if r["agrees"] else "NO",
                  f"{r['quantized']}, dequantized" if r.get("quantized") else r["base_dtype"] or "-", ",".join(fmt_num(s) for s in r["scales"]), _blocks(r),
                  r["tied_with"] or "-", "ok" if r["ok"] else "ERROR") for r in rows[:FIT_ROWS]]
        if doc["findings"]:
            write()
        write(f"fit against {fit['base']}: {fit['fit']} of {fit['targets']} targets fit"
              + ("" if fit["changes_base"] else "; the adapter changes nothing in the base"))
        if shown:
            write(table(None, ["target", "base key", "layout", "shape", "base shape", "agrees", "base dtype",
                               "scale", "blocks", "tied with", "fit"], shown))
        if len(rows) > FIT_ROWS:
            write(f"... and {len(rows) - FIT_ROWS} more targets (--json lists every one)")
        ex = fit.get("experts")
        if ex:  # which expert layouts were found: the base's, the targets', and how many moved between the forms
            write(f"experts: base {', '.join(ex['base'])}; targets "
                  + (", ".join(f"{n} {k}" for k, n in sorted(ex["targets"].items())) or "none")
                  + (f"; {ex['moved']} moved between per-expert and fused tensors" if ex["moved"] else ""))
        if fit["unmatched"]:  # every one: a wrong base shows as many names, and each is worth seeing
            write(f"match nothing in the base ({len(fit['unmatched'])}): "
                  + ", ".join(escape(n) for n in fit["unmatched"]))
    verdict = "valid" if doc["valid"] else "invalid"
    __getattr__("err").print(f"{escape(doc['path'])}: {doc['dialect']}: {verdict}: {doc['errors']} errors, "
                             f"{doc['warnings']} warnings, {doc['targets']} targets")


def _blocks(row: dict) -> str:
    """"whole", or the target index: [rows] (and [cols] when not all columns) of each block."""
    if row["whole"]:
        return "whole" if row["kind"] == "lora" else "full"
    out = []
    for b in row["blocks"]:
        r0, r1 = b["rows"]
        c0, c1 = b["cols"]
        out.append(f"[{r0}:{r1}]" + ("" if c0 == 0 and (c1 == _cols(row)) else f"[:, {c0}:{c1}]"))
    return " ".join(out)


def _cols(row: dict) -> int:
    """The in dimension of a row's matrix view (the base shape, seen through the layout)."""
    shape = row["shape"]
    if row["layout"] in ("fan_in_fan_out", "embedding"):
        return shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    return n
