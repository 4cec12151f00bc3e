"""Plots of training runs as a standalone SVG (no plotting library): one panel per metric, one line
per run.

    python -m pbrl.plot RUN_DIR [RUN_DIR ...] --out runs.svg \
        [--metrics reward,kl,entropy,response_length,acc/avg]

Each RUN_DIR is a run.out_dir (its metrics.jsonl is read); a metric a run never logged is left out
of its panel, and a panel no run logged is dropped. The toy experiment draws its curves with the
same function.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from html import escape
from pathlib import Path

from pbrl.cli import run_main
from pbrl.files import read_text

PANELS = {"reward": "mean reward", "kl": "KL to the reference", "entropy": "entropy (nats/token)",
          "response_length": "response length (tokens)", "acc/avg": "target-language accuracy (%)"}
COLORS = ["#1b6ca8", "#d1495b", "#66a182", "#edae49", "#7b5ea7", "#3d3d3d", "#e07a5f", "#00a6a6"]


def read_run(run_dir) -> list[dict]:
    """The metrics.jsonl rows of a run directory, one per logged step: each a JSON object with a
    whole-number "step"; a file with no row is refused."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; expected a run directory "
                                f"(run.out_dir)")
    rows = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            step = row.get("step") if isinstance(row, dict) else None
            if not _number(step) or step != int(step) or step < 0:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a whole-number "
                                 f"\"step\", got {line.strip()[:80]}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no step logged (the file is empty)")
    return rows


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def points(rows: list[dict], metric: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that logged a finite `metric`."""
    return [(r["step"], r[metric]) for r in rows if _number(r.get(metric))
            and math.isfinite(r[metric])]


def not_finite(rows: list[dict], metric: str) -> list[int]:
    """The steps whose `metric` is NaN or infinite (left out of the plot, and said)."""
    return [r["step"] for r in rows if _number(r.get(metric)) and not math.isfinite(r[metric])]


def svg_panels(runs: dict[str, list[dict]], metrics: list[str], columns: int = 3, width: int = 320,
               height: int = 210, bands: dict[str, list[list[dict]]] | None = None) -> str:
    """runs: name -> rows with a "step" and the metrics -> an SVG of one panel per metric (with
    min/max and last step marked), laid out in `columns`, and a legend of the runs. bands: name ->
    several runs' rows (seeds), whose range at each step is shaded behind the run's line."""
    series = {m: {name: points(rows, m) for name, rows in runs.items()} for m in metrics}
    series = {m: s for m, s in series.items() if any(s.values())}
    ranges = {m: {name: [(step, min(vs), max(vs))
                         for step, vs in _by_step([points(rows, m) for rows in seeds]).items()]
                  for name, seeds in (bands or {}).items()} for m in series}
    rows_of_panels = -(-len(series) // columns) or 1
    legend_y = rows_of_panels * (height + 20) + 20
    total_w = columns * (width + 60) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" '
             f'height="{legend_y + 16 * len(runs) + 10}" font-family="sans-serif" '
             f'font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for p, (metric, lines) in enumerate(series.items()):
        x0, y0 = 60 + (p % columns) * (width + 60), 24 + (p // columns) * (height + 20)
        parts += _panel(metric, lines, ranges[metric], x0, y0, width - 30, height - 40)
    for i, name in enumerate(runs):
        y = legend_y + 16 * i
        parts += [f'<rect x="60" y="{y - 6}" width="18" height="4" '
                  f'fill="{COLORS[i % len(COLORS)]}"/>',
                  f'<text x="84" y="{y}">{escape(name)}</text>']
    parts.append("</svg>")
    return "\n".join(parts)


def _panel(metric: str, lines: dict, ranges: dict, x0: int, y0: int, w: int, h: int) -> list[str]:
    """One metric's panel at (x0, y0), w x h: its frame and labels, each band, each run's line."""
    values = [v for pts in lines.values() for _, v in pts] + \
        [v for spans in ranges.values() for _, lo, hi in spans for v in (lo, hi)]
    steps = [s for pts in lines.values() for s, _ in pts]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + (abs(lo) or 1.0)
    first, last = min(steps), max(steps)
    span = (last - first) or 1

    def xy(points) -> str:
        return " ".join(f"{x0 + w * (s - first) / span:.1f},"
                        f"{y0 + h * (1 - (v - lo) / (hi - lo)):.1f}" for s, v in points)
    parts = [f'<text x="{x0}" y="{y0 - 8}" '
             f'font-weight="bold">{escape(PANELS.get(metric, metric))}</text>',
             f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
             f'<text x="{x0 - 4}" y="{y0 + 10}" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end">{lo:.3g}</text>',
             f'<text x="{x0}" y="{y0 + h + 14}">step {first}</text>',
             f'<text x="{x0 + w}" y="{y0 + h + 14}" text-anchor="end">step {last}</text>']
    for i, spans in enumerate(ranges.values()):
        outline = [(step, top) for step, _, top in spans]
        outline += [(step, bottom) for step, bottom, _ in reversed(spans)]
        parts.append(f'<polygon points="{xy(outline)}" fill="{COLORS[i % len(COLORS)]}" '
                     f'fill-opacity="0.15" stroke="none"/>')
    for i, pts in enumerate(lines.values()):
        color = COLORS[i % len(COLORS)]
        if len(pts) == 1:
            cx, cy = xy(pts).split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
        elif pts:
            parts.append(f'<polyline points="{xy(pts)}" fill="none" stroke="{color}" '
                         f'stroke-width="1.5"/>')
    return parts


def _by_step(runs: list[list[tuple[int, float]]]) -> dict[int, list[float]]:
    """Several runs' (step, value) points -> step -> the values logged at it, in step order."""
    out: dict[int, list[float]] = {}
    for pts in runs:
        for step, value in pts:
            out.setdefault(step, []).append(value)
    return dict(sorted(out.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (run.out_dir)")
    ap.add_argument("--out", required=True, help="the SVG file to write")
    ap.add_argument("--metrics", default=",".join(PANELS),
                    help="metrics.jsonl keys, one panel each")
    args = ap.parse_args(argv)
    runs = {str(d): read_run(d) for d in args.runs}
    metrics = [m for m in args.metrics.split(",") if m]
    logged = {k for rows in runs.values() for row in rows for k in row}
    unknown = [m for m in metrics if m not in logged and m not in PANELS]  # a typo, say
    if not metrics or unknown:
        raise ValueError(f"--metrics: no run logged {unknown[0] if unknown else 'anything'!r}; "
                         f"they logged: {', '.join(sorted(logged - {'step'}))}")
    for name, rows in runs.items():
        for metric in metrics:
            steps = not_finite(rows, metric)
            if steps:
                print(f"note: {name}: {metric} is NaN or infinite at step"
                      f"{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps[:10]))}"
                      f"{' ...' if len(steps) > 10 else ''}; those points are left out",
                      file=sys.stderr)
    Path(args.out).write_text(svg_panels(runs, metrics))
    print(f"wrote {args.out} ({len(runs)} runs, metrics {', '.join(metrics)})")


if __name__ == "__main__":
    run_main(main)
