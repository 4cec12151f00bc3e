"""Appending benchmark rows to a CSV next to the scripts (a header when the file is new)."""
import csv
from pathlib import Path


def append_csv(name: str, rows: list[dict]) -> Path:
    """Append rows to benchmarks/<name>. A file whose header names other columns (an older version
    of the script) is kept as <name>.old and a new one begun, so that no row lands under the wrong
    column."""
    out = Path(__file__).with_name(name)
    fields = list(rows[0])
    if out.exists():
        with out.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != fields:
            kept = out.rename(out.with_name(name + ".old"))
            print(f"{out} had the columns {header}; kept as {kept}, starting a new file")
    new = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return out
