"""Fixed-width text tables for the terminal summaries of the suite's plugins."""

from __future__ import annotations


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """The header and each row as left-aligned columns two spaces apart, each as wide as its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
