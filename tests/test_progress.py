"""pbrl.cli: Progress (tqdm's bar in a terminal, plain lines with rate and ETA elsewhere, nothing
when disabled) and run_main's one-line errors."""
import io
import re

from pbrl.cli import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    with Progress(4, "pivot", " problems", every=0) as bar:
        for _ in range(4):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and "\r" not in "".join(lines)
    assert re.fullmatch(r"pivot: 1/4 \(25%\) \[00:00<00:0\d, [\d.]+ problems/s\]",
                        lines[0]), lines[0]
    assert lines[-1].startswith("pivot: 4/4 (100%) [00:00<00:00, ")


def test_at_most_one_plain_line_per_interval_and_the_last(capsys):
    with Progress(1000, "eval", every=3600) as bar:
        for _ in range(1000):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0]
            for line in lines] == ["eval: 1/1000 (0%)", "eval: 1000/1000 (100%)"]


def test_tqdm_bar_in_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with Progress(3, "train", " steps") as bar:
        for _ in range(3):
            bar.update()
    out = terminal.getvalue()
    assert "\r" in out and "train: 100%|" in out and "3/3" in out  # tqdm redraws one line


def test_disabled_progress_prints_nothing(capsys, monkeypatch):
    with Progress(3, "rank 1", every=0, enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with Progress(3, "rank 1", enabled=False) as bar:
        bar.update(3)
    assert terminal.getvalue() == ""


def test_a_missing_optional_package_ends_with_one_line(capsys):
    """run_main turns an ImportError that names the package to install (parquet without pyarrow)
    into `error:`."""
    import pytest

    from pbrl.cli import run_main

    def main(argv):
        raise ImportError("x.parquet: reading parquet needs pyarrow (pip install pyarrow), or "
                          "convert it to JSONL")
    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: x.parquet: reading parquet needs pyarrow (pip "
                                       "install pyarrow), or convert it to JSONL\n")
