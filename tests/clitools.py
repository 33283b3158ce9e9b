"""Running the CLI in process, as the tests of its commands do."""

from __future__ import annotations

from click.testing import CliRunner

from loratool.cli import cli


def run(*args):
    """(exit code, stdout, stderr) of `loratool ARGS`, in process."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_error_line(err: str) -> str:
    """The one `error: ...` line a refusal prints (fails if stderr holds anything else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
