"""Reading and writing the project's text files: errors name the file and line, and writes are atomic.

Every reader decodes UTF-8 (a leading byte-order mark is dropped, as editors on Windows write one) and turns a
decoding or parsing failure into a ValueError that says which file and which line, never a bare codec error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def is_hub_id(text: str) -> bool:
    """'org/name' (a Hugging Face hub repository), as opposed to a local path."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def resolve(path_or_id, repo_type: str = "model", allow_patterns=("*.json", "*.safetensors", "*.jinja")) -> Path:
    """A local path as is (a model must be a directory); a hub id 'org/name' is fetched with huggingface_hub's
    snapshot_download (only the files matching allow_patterns); anything else is an error that says which."""
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
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         f"save the file as UTF-8") from None


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


def write_atomic(path, write) -> None:
    """write(tmp_path) then rename onto `path`: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
