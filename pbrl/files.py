"""Reading and writing the project's text files: errors name the file and line, and writes are
atomic.

Every reader decodes UTF-8 (a leading byte-order mark is dropped, as editors on Windows write one)
and turns a decoding or parsing failure into a ValueError that says which file and which line, never
a bare codec error.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


def is_hub_id(text: str) -> bool:
    """'org/name' (a Hugging Face hub repository), as opposed to a local path."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def resolve(path_or_id, repo_type: str = "model",
            allow_patterns=("*.json", "*.safetensors", "*.jinja")) -> Path:
    """A local path as is (a model must be a directory); a hub id 'org/name' is fetched with
    huggingface_hub's snapshot_download (only the files matching allow_patterns); anything else is
    an error that says which."""
    path = Path(path_or_id)
    if path.is_dir() or (path.is_file() and repo_type == "dataset"):
        return path
    text = str(path_or_id)
    if path.exists() or not is_hub_id(text):
        what = "local model directory" if repo_type == "model" else "local file or directory"
        raise FileNotFoundError(f"{text!r} is neither a {what} nor a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(text, repo_type=repo_type, allow_patterns=list(allow_patterns)))


def read_text(path) -> str:
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                         f"{e.start}); save the file as UTF-8") from None


def read_json(path) -> dict:
    """A JSON object (config.json, tokenizer_config.json, ...)."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_jsonl_line(line: str, where: str, required: tuple[str, ...] = ()) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    return row


def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    """One JSON object per line; blank lines are skipped."""
    return [parse_jsonl_line(line, f"{path}:{n}", required)
            for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


@contextmanager
def write_atomic(path):
    """`with write_atomic(path) as tmp:` write tmp; it is renamed onto path when the block succeeds,
    so a reader never sees a half-written file (and a failed write leaves no temporary behind)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Append-only record caches (pivot references, translations): one JSON object per line with a unique
# "id", written one batch at a time and flushed, so a crash loses at most the batch in flight and a
# rerun resumes.
# --------------------------------------------------------------------------------------------------
def read_records(path, fields: tuple[str, ...]) -> dict[str, dict]:
    """id -> record of a cache. A last line without its newline is kept when it is a complete record
    and ignored when it is not (a crash mid-write). A repeated id is an error."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = read_text(path).split("\n")
    records, first_line = {}, {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        if line_no == len(lines):  # no newline after it: complete, or torn by a crash
            try:
                record = parse_jsonl_line(line, where, fields)
            except ValueError:
                continue
        else:
            record = parse_jsonl_line(line, where, fields)
        if record["id"] in records:
            raise ValueError(f"{where}: id {record['id']!r} repeats line "
                             f"{first_line[record['id']]}; a cache holds one record per id")
        records[record["id"]], first_line[record["id"]] = record, line_no
    return records


def append_records(path, records: list[dict], fields: tuple[str, ...]) -> None:
    """Append records as JSON lines and flush them to disk. A last line without its newline first
    gets one when it is a complete record (read_records kept it), and is cut when it is not (the
    write a crash interrupted)."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                parse_jsonl_line(data[cut:].decode("utf-8", errors="replace"), str(path), fields)
                path.write_bytes(data + b"\n")
            except ValueError:
                path.write_bytes(data[:cut])
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
