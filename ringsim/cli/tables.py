"""Tables as text: aligned columns for the terminal, Markdown for result files. The CLI, the
GPU harness and the tutorials print through these."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def format_table(
    headers: Sequence[object],
    rows: Sequence[Sequence[object]],
    left: Collection[int] = (),
    indent: str = "  ",
    rule: bool = False,
) -> list[str]:
    """Lines of an aligned text table: columns right-aligned except those in ``left``, each
    line after ``indent``, a rule of dashes under the header if ``rule``."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append((indent + "  ".join(parts)).rstrip())
    if rule:
        lines.insert(1, (indent + "  ".join("-" * w for w in widths)).rstrip())
    return lines


def text_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A plain table for logs: every column left-aligned, a rule under the header."""
    return "\n".join(format_table(headers, rows, left=range(len(headers)), indent="", rule=True))


def markdown_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown (GitHub) table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
