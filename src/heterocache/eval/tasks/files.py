"""Reading benchmark files that users download themselves, with a clear error when they are absent."""

from __future__ import annotations

import json
from pathlib import Path


class BenchmarkDataMissing(FileNotFoundError):
    """A benchmark's published files are not where the loader expects them.

    The message names the expected path and where to get the files; nothing is downloaded.
    """


def require(path: Path, benchmark: str, instructions: str) -> Path:
    """``path`` if it is a file, else :class:`BenchmarkDataMissing` explaining how to get it."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataMissing(
            f"{benchmark} data not found: expected {path}. {instructions} "
            "(heterocache never downloads benchmark data.)"
        )
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (all when None or 0) JSON objects of a JSON-lines file; blank lines skipped."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return rows


def read_json(path: Path) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
