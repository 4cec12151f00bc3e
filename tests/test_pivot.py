import json
import re

import pytest

import pbrl.pivot as pivot
from conftest import save_hf_model, subprocess_env
from pbrl.checkpoint import load_model
from pbrl.data import Problem
from pbrl.tokenizer import Tokenizer

PROBLEMS = [Problem(f"mgsm-{i}", "en", f"Janet has {i} apples and buys 5 more. How "
                                       f"many?", str(i + 5))
            for i in range(5)]
WRITER = {"model": "pivot-under-test", "max_new_tokens": 5}  # what the records say wrote them


@pytest.fixture(scope="module")
def pivot_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("pivot")
    save_hf_model(d, "llama", seed=2)
    return d, load_model(d), Tokenizer.from_pretrained(d)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_a_crash_writes_each_id_once(tmp_path, pivot_model, monkeypatch):
    _, model, tok = pivot_model
    clean = tmp_path / "clean.jsonl"
    pivot.write_references(model, tok, PROBLEMS, clean, WRITER, batch_size=2, max_new_tokens=5,
                           log=lambda m: None)

    out = tmp_path / "refs.jsonl"
    real_generate, calls = pivot.generate, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(pivot, "generate", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        pivot.write_references(model, tok, PROBLEMS, out, WRITER, batch_size=2, max_new_tokens=5,
                               log=lambda m: None)
    assert [r["id"] for r in lines(out)] == ["mgsm-0", "mgsm-1"]  # the first batch survived
    with out.open("a") as f:
        f.write('{"id": "mgsm-2", "refer')  # a write torn by the crash
    monkeypatch.setattr(pivot, "generate", real_generate)
    written = pivot.write_references(model, tok, PROBLEMS, out, WRITER, batch_size=2,
                                     max_new_tokens=5, log=lambda m: None)
    assert written == 3
    assert lines(out) == lines(clean)  # same records, each id once, in order
    assert pivot.write_references(model, tok, PROBLEMS, out, WRITER, batch_size=2, max_new_tokens=5,
                                  log=lambda m: None) == 0


def record(i: int, question: str | None = None) -> str:
    return json.dumps({"id": f"mgsm-{i}", "question": question or PROBLEMS[i].question,
                       "reference": f"The answer is {i}.", "pivot": WRITER})


def test_match_references_lists_missing_ids(tmp_path):
    out = tmp_path / "refs.jsonl"
    out.write_text("".join(record(i) + "\n" for i in (0, 2)))
    assert pivot.match_references(out, PROBLEMS[:1]) == {"mgsm-0": "The answer is 0."}
    with pytest.raises(KeyError,
                       match="no reference for problem id\\(s\\): mgsm-1, mgsm-3, mgsm-4"):
        pivot.match_references(out, PROBLEMS)
    out.write_text('{"id": "mgsm-0", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"refs.jsonl:1: missing field\(s\) \['reference'\]"):
        pivot.read_references(out)


def test_cache_written_for_other_problems_is_refused(tmp_path):
    out = tmp_path / "refs.jsonl"
    out.write_text(record(0) + "\n" + record(1, "Tom has 9 pears. How many?") + "\n")
    with pytest.raises(ValueError,
                       match=r"refs.jsonl: the reference for id 'mgsm-1' answers another question "
                                         r"\('Tom has 9 pears"):
        pivot.match_references(out, PROBLEMS[:2])
    # and before generating anything more
    with pytest.raises(ValueError, match=r"answers another question"):
        pivot.write_references(None, None, PROBLEMS, out, WRITER, log=lambda m: None)


def test_repeated_id_is_an_error(tmp_path):
    out = tmp_path / "refs.jsonl"
    out.write_text(record(0) + "\n" + record(1) + "\n" + record(0) + "\n")
    with pytest.raises(ValueError, match=r"refs.jsonl:3: id 'mgsm-0' repeats line 1"):
        pivot.read_references(out)


def test_complete_last_record_without_newline_is_kept(tmp_path, pivot_model):
    _, model, tok = pivot_model
    out = tmp_path / "refs.jsonl"
    out.write_text(record(0) + "\n" + record(1))  # an editor that drops the final newline
    assert pivot.match_references(out, PROBLEMS[:2]) == {"mgsm-0": "The answer is 0.",
                                                         "mgsm-1": "The answer is 1."}
    assert pivot.write_references(model, tok, PROBLEMS[:3], out, WRITER, max_new_tokens=3,
                                  log=lambda m: None) == 1
    assert [r["id"] for r in lines(out)] == ["mgsm-0", "mgsm-1", "mgsm-2"]


def test_cache_that_is_not_utf8_names_the_line(tmp_path):
    out = tmp_path / "refs.jsonl"
    damaged = record(1).encode("utf-8").replace(b"answer", b"\xe4nswer")
    out.write_bytes(record(0).encode() + b"\n" + damaged + b"\n")
    with pytest.raises(ValueError, match=r"refs.jsonl:2: not UTF-8 text"):
        pivot.read_references(out)


def test_cli_on_fixture_data(tmp_path, pivot_model, capsys):
    model_dir, _, _ = pivot_model
    (tmp_path / "mgsm_en.tsv").write_text("".join(f"{p.question}\t{p.answer}\n" for p in PROBLEMS))
    pivot.main(["--model", str(model_dir), "--data", str(tmp_path),
                "--out", str(tmp_path / "r.jsonl"), "--limit", "3", "--max-new-tokens", "4"])
    records = lines(tmp_path / "r.jsonl")
    assert [r["id"] for r in records] == ["mgsm-0", "mgsm-1", "mgsm-2"]
    assert set(records[0]) == {"id", "question", "reference", "answer", "pivot"}
    assert records[0]["pivot"] == pivot.pivot_writer(model_dir, 4, False)
    assert re.search(r"^pivot: 3/3 \(100%\) \[\d\d:\d\d<00:00, [\d.]+ problems/s\]$",
                     capsys.readouterr().err, re.M)


def test_two_ranks_write_each_id_once_as_one_rank_does(tmp_path, pivot_model):
    """`torchrun --nproc_per_node=2 -m pbrl.pivot`: each rank answers its share (2 ids of mgsm-0..4
    are already cached), the parts are merged into the one cache, in problem order, equal to a
    single process's greedy answers."""
    import subprocess
    import sys
    from pathlib import Path
    model_dir, model, tok = pivot_model
    root = Path(__file__).resolve().parents[1]
    single = tmp_path / "single.jsonl"
    writer = pivot.pivot_writer(model_dir, 6, False)  # as the command line will record it
    pivot.write_references(model, tok, PROBLEMS, single, writer, batch_size=2, max_new_tokens=6,
                           log=lambda m: None)
    (tmp_path / "mgsm_en.tsv").write_text("".join(f"{p.question}\t{p.answer}\n" for p in PROBLEMS))
    out = tmp_path / "refs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in lines(single)
                           if r["id"] in ("mgsm-1", "mgsm-3")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "-m", "pbrl.pivot", "--model", str(model_dir),
                           "--data", str(tmp_path), "--out", str(out), "--batch-size", "2",
                           "--max-new-tokens", "6"], cwd=root, capture_output=True, text=True,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("3 to generate on 2 ranks" in done.stderr
            and "pivot (rank 0's share of 2): 2/2 (100%)" in done.stderr)
    assert "1/1" not in done.stderr  # rank 1 works silently
    assert [r["id"] for r in lines(out)] == ["mgsm-1", "mgsm-3", "mgsm-0", "mgsm-2", "mgsm-4"]
    assert sorted(lines(out), key=lambda r: r["id"]) == lines(single)
    assert not list(tmp_path.glob("refs.jsonl.rank*"))


def test_parts_a_crashed_multi_rank_run_left_are_merged_first(tmp_path, pivot_model):
    """A 3-rank run died after its ranks wrote parts; a 1-process rerun merges them and generates
    the rest only."""
    _, model, tok = pivot_model
    out = tmp_path / "refs.jsonl"
    out.write_text(record(0) + "\n")
    (tmp_path / "refs.jsonl.rank1").write_text(record(1) + "\n" + record(4) + "\n")
    # torn by the crash
    (tmp_path / "refs.jsonl.rank2").write_text(record(2) + "\n" + '{"id": "mgsm-3", "ques')
    assert pivot.write_references(model, tok, PROBLEMS, out, WRITER, max_new_tokens=3,
                                  log=lambda m: None) == 1
    assert [r["id"] for r in lines(out)] == ["mgsm-0", "mgsm-1", "mgsm-2", "mgsm-4", "mgsm-3"]
    assert [r["reference"] for r in lines(out)][:4] == [f"The answer is {i}." for i in (0, 1, 2, 4)]
    assert not list(tmp_path.glob("refs.jsonl.rank*"))
