"""Appending benchmark rows to a CSV next to the scripts (a header when the file is new)."""
import csv
from pathlib import Path


def append_csv(name: str, rows: list[dict]) -> Path:
    out = Path(__file__).with_name(name)
    new = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return out
