"""Reading and writing the project's text files: errors name the file and line, and writes are
atomic.

Every reader decodes UTF-8 (a leading byte-order mark is dropped, as editors on Windows write one)
and turns a decoding or parsing failure into a ValueError that says which file and which line, never
a bare codec error.
"""
from __future__ import annotations

import hashlib
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
    an error that says which. 'data/gsm8k_train' could be either: when it is not here, the error
    says so, and why it could not be fetched either."""
    path = Path(path_or_id)
    if path.is_dir() or (path.is_file() and repo_type == "dataset"):
        return path
    text = str(path_or_id)
    what = "local model directory" if repo_type == "model" else "local file or directory"
    if path.exists() or not is_hub_id(text):
        raise FileNotFoundError(f"{text!r} is neither a {what} nor a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(text, repo_type=repo_type,
                                      allow_patterns=list(allow_patterns)))
    except Exception as e:  # offline, an unknown or gated repository, a network error...
        raise FileNotFoundError(hub_failure(text, what, e)) from None


def hub_failure(text: str, what: str, error: Exception) -> str:
    """Why a path that could be local or a hub id was neither."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (f"{text!r}: no such {what} (looked in {Path.cwd()}), and fetching it as a hub id "
            f"failed: {type(error).__name__}: {reason}")


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


# What a field must hold: {name: the accepted JSON types}. A field present but null, or of another
# type, is as wrong as a missing one (a null question would train on "Question: None").
TEXT, NUMBER, NUMBER_OR_TEXT, FLAG = (str,), (int, float), (int, float, str), (bool,)
KIND_NAMES = {str: "a string", int: "a number", float: "a number", bool: "true or false"}


def check_fields(row: dict, where: str, required: dict[str, tuple]) -> dict:
    missing = [k for k in required if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    for key, kinds in required.items():
        value = row[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(dict.fromkeys(KIND_NAMES[k] for k in kinds))
            raise ValueError(f"{where}: field {key!r} is {json.dumps(value)}; expected {expected}")
    return row


def parse_jsonl_line(line: str, where: str, required: dict[str, tuple] = {}) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return check_fields(row, where, required)


def read_jsonl(path, required: dict[str, tuple] = {}) -> list[dict]:
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
def read_appended(path, fields: dict[str, tuple]) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a file written by appending JSON lines. A last line
    without its newline is kept when it is complete and skipped when it is not (a crash, or a full
    disk, mid-write); any other bad line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines, out = read_text(path).split("\n"), []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((line_no, parse_jsonl_line(line, f"{path}:{line_no}", fields)))
        except ValueError:
            if line_no < len(lines):  # not the torn last line
                raise
    return out


def read_records(path, fields: dict[str, tuple]) -> dict[str, dict]:
    """id -> record of a cache (read_appended's lines). A repeated id is an error."""
    records, first_line = {}, {}
    for line_no, record in read_appended(path, fields):
        if record["id"] in records:
            raise ValueError(f"{path}:{line_no}: id {record['id']!r} repeats line "
                             f"{first_line[record['id']]}; a cache holds one record per id")
        records[record["id"]], first_line[record["id"]] = record, line_no
    return records


def append_records(path, records: list[dict], fields: dict[str, tuple]) -> None:
    """Append records as JSON lines and flush them to disk. A last line without its newline first
    gets one when it is a complete record (read_records kept it), and is cut when it is not (the
    write a crash interrupted). Only ever appends or cuts that torn line: a failed write (a full
    disk) loses no earlier record, and its error names the file."""
    path = Path(path)
    try:
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                try:
                    parse_jsonl_line(data[cut:].decode("utf-8", errors="replace"), str(path),
                                     fields)
                    with path.open("ab") as f:
                        f.write(b"\n")
                except ValueError:
                    os.truncate(path, cut)
        with path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, f"{e.strerror or e} (while appending to it; the records before "
                               f"are kept, and a rerun resumes from them)", str(path)) from None


def fresh_dir(base: Path) -> Path:
    """base, or the first of base-2, base-3, ... that is empty or absent: a rerun never touches
    earlier results."""
    candidates = (base if i == 1 else base.with_name(f"{base.name}-{i}") for i in range(1, 10_000))
    return next(c for c in candidates if not (c.is_dir() and any(c.iterdir())))


def results_dir(given: str | None, default: str, holds: tuple[str, ...]) -> Path:
    """Where an entry point writes its results, made now (a path that cannot be a directory fails
    before any work): `given`, which must not hold earlier results (`holds`), or the first of
    default, default-2, ... that is empty or absent."""
    out = Path(given) if given else fresh_dir(Path(default))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; the results are a directory")
    earlier = [name for name in holds if (out / name).exists()]
    if earlier:
        raise FileExistsError(f"--out {out} already holds results ({', '.join(earlier)}); choose "
                              f"another --out (nothing was changed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileExistsError(f"--out {out} cannot be made a directory: {e.strerror or e}") \
            from None
    return out


def weights_sha256(directory: Path, edge: int = 2**20) -> str:
    """A model identified by what it is, not by how its path is spelled: each weight file's name,
    size, and its first and last `edge` bytes (a header and tensors), hashed; cheap at any size."""
    digest = hashlib.sha256()
    for file in sorted(directory.glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(edge)
            f.seek(max(size - edge, 0))
            digest.update(f"{file.name}:{size}:".encode() + head + f.read(edge))
    return digest.hexdigest()[:16]
