"""pbrl.plot: an SVG that XML parsers read, one panel per logged metric, one line per run, points
where they belong."""
import json
import xml.etree.ElementTree as ET

import pytest

from pbrl.plot import main, read_run, svg_panels

SVG = "{http://www.w3.org/2000/svg}"


def write_run(directory, rows):
    directory.mkdir()
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_panels_lines_and_coordinates(tmp_path, capsys):
    a = write_run(tmp_path / "a", [{"step": 0, "acc/avg": 10.0}] +
                  [{"step": s, "reward": 0.1 * s, "kl": 0.01}
                   for s in range(1, 5)] + [{"step": 4, "acc/avg": 30.0}])
    b = write_run(tmp_path / "b", [{"step": s, "reward": 0.2, "kl": 0.02 * s} for s in range(1, 3)])
    main([str(a), str(b), "--out", str(tmp_path / "p.svg"),
          "--metrics", "reward,kl,entropy,acc/avg"])
    assert "2 runs" in capsys.readouterr().out
    svg = ET.parse(tmp_path / "p.svg").getroot()
    titles = [t.text for t in svg.iter(f"{SVG}text") if t.get("font-weight") == "bold"]
    # no entropy logged
    assert titles == ["mean reward", "KL to the reference", "target-language accuracy (%)"]
    lines = list(svg.iter(f"{SVG}polyline"))
    assert len(lines) == 5  # reward a, b; kl a, b; accuracy a (b logged none)
    reward_a = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    xs, ys = zip(*reward_a)
    # rising
    assert len(reward_a) == 4 and xs == tuple(sorted(xs)) and ys == tuple(sorted(ys, reverse=True))
    assert ys[-1] == pytest.approx(24.0)  # the maximum (0.4) at the panel's top edge


def test_single_points_and_errors(tmp_path):
    run = write_run(tmp_path / "a", [{"step": 1, "reward": 0.5}])
    svg = ET.fromstring(svg_panels({"a": read_run(run)}, ["reward"]))
    assert len(list(svg.iter(f"{SVG}circle"))) == 1 and not list(svg.iter(f"{SVG}polyline"))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl; expected a run directory"):
        read_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_run(run)
