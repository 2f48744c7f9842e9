"""A cheap look into local data files before a run starts, the full look when one fails, and the error of a bad record.

:func:`preflight` reads the first records of one file (``SAMPLE_RECORDS`` records or ``SAMPLE_BYTES`` bytes of
text, whichever comes first; on past them only while no document has been seen) and reports the first content problem
it meets, with the row where there is one (1-based line of a JSON-lines file, or position in a JSON array), the cause
and the fix: a gzip file that is not one, is corrupt or is cut short (for ``.gz`` this reads the gzip header and the
first compressed block(s); a file cut short further on shows only when it is read that far), bytes that are not UTF-8,
invalid JSON, a record that is not a JSON object, a record without ``text`` (the column the recipe reads; missing or
null) or whose ``text`` is not a string. It counts the documents it read (records with a non-empty ``text``; a
``.txt`` file is one document when it holds a non-blank character) and their UTF-8 bytes, and says whether it read
the whole file, so the caller can judge emptiness and, roughly, length.

:func:`scan` runs the same checks over every record (what finds the row of an error the reader met later; also
``python -m lowrank_recipes.recipes.data.file_check FILE ...``, exit 1 when a file has a problem).

:class:`DataContentError` is what the run raises when the reader meets such a record past the pre-flight sample.

Standard library only: the config is checked with it before the data pipeline's libraries are imported.
"""

from __future__ import annotations

import codecs
import gzip
import json
import sys
import zlib
from dataclasses import dataclass
from typing import IO

TEXT_FIELD = "text"
SAMPLE_RECORDS = 100
SAMPLE_BYTES = 256 << 10
_READ_CHUNK = 64 << 10
JSON_FIX = 'fix: one JSON object per line with a string "text" field, such as {"text": "..."}'
GZIP_FIX = "fix: download or compress the file again (`gzip -t FILE` tests a gzip file)"
UTF8_FIX = "fix: re-encode the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)"
SCAN_COMMAND = "python -m lowrank_recipes.recipes.data.file_check"


class DataContentError(ValueError):
    """A data file's content cannot be read (invalid JSON, a record without a string ``text``, a truncated gzip...),
    met while the run reads it: one paragraph naming the file (the files, when the reader does not say which), the row
    where known, the cause and the fix.

    Raised inside a DataLoader worker, it comes back to the main process re-raised by torch with the worker's
    traceback text as its message; the constructor keeps only the original paragraph, so the message never holds a
    traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_message(str(message)))


def _original_message(message: str) -> str:
    if "Traceback" not in message:
        return message
    marker = f"{DataContentError.__name__}: "
    for line in reversed(message.strip().splitlines()):
        if marker in line:
            return line.split(marker, 1)[1]
    return message.strip().splitlines()[-1]


@dataclass(frozen=True)
class FileReport:
    """What reading (the start of) one data file showed.

    Attributes:
        path: the file.
        problem: the first content problem met, as ``[row N: ]cause; fix: ...``; None when none.
        documents: documents read (records with a non-empty ``text``; a text file with a non-blank character is one).
        text_bytes: UTF-8 bytes of those documents' text.
        complete: whether the whole file was read (then ``documents`` and ``text_bytes`` are the file's).
    """

    path: str
    problem: str | None
    documents: int
    text_bytes: int
    complete: bool


def _stem(path: str) -> str:
    return path[: -len(".gz")] if path.endswith(".gz") else path


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_problem(err: BaseException, where: str) -> str:
    """A reading error (gzip, zlib, UTF-8) as ``cause; fix``."""
    if isinstance(err, EOFError):
        return f"{where}truncated gzip: the compressed data ends before its end marker ({err}); {GZIP_FIX}"
    if isinstance(err, gzip.BadGzipFile):
        kind = "not a gzip file" if "Not a gzipped file" in str(err) else "corrupt gzip data"
        return f"{where}{kind} ({err}); {GZIP_FIX}"
    if isinstance(err, zlib.error):
        return f"{where}corrupt gzip data (zlib: {err}); {GZIP_FIX}"
    if isinstance(err, UnicodeDecodeError):
        return f"{where}not UTF-8 text (byte {err.object[err.start : err.start + 1]!r}); {UTF8_FIX}"
    return f"{where}cannot be read ({type(err).__name__}: {err})"


def _record_problem(record: object) -> str | None:
    """Why one parsed record is not a document record, as ``cause; fix``; None when it is one (empty text included)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__} where a JSON object is expected; {JSON_FIX}"
    if record.get(TEXT_FIELD) is None:
        fields = ", ".join(map(str, record)) or "none"
        cause = f"{TEXT_FIELD!r} is null" if TEXT_FIELD in record else f"no {TEXT_FIELD!r} field (fields: {fields})"
        return f"{cause}, the text the recipe reads; {JSON_FIX}"
    text = record[TEXT_FIELD]
    if not isinstance(text, str):
        return f"{TEXT_FIELD!r} is a JSON {type(text).__name__}, not a string; {JSON_FIX}"
    return None


class _Counter:
    """Documents and bytes read so far, and whether the sample limits allow stopping."""

    def __init__(self, limit: bool) -> None:
        self.limit = limit
        self.documents = 0
        self.text_bytes = 0
        self.records = 0
        self.read = 0

    def add(self, record: object, size: int) -> None:
        self.records += 1
        self.read += size
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict) and isinstance(record.get(TEXT_FIELD), str):
            text = record[TEXT_FIELD]
        else:
            text = ""
        if text:
            self.documents += 1
            self.text_bytes += len(text.encode("utf-8", errors="replace"))

    def enough(self) -> bool:
        return self.limit and self.documents > 0 and (self.records >= SAMPLE_RECORDS or self.read >= SAMPLE_BYTES)

    def report(self, path: str, problem: str | None, complete: bool) -> FileReport:
        return FileReport(path, problem, self.documents, self.text_bytes, complete)


def _check_text(path: str, f: IO[bytes], count: _Counter) -> FileReport:
    """A text file is one document (the whole file): check it decodes, count it when it holds a non-blank char."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size, blank = 0, True
    try:
        while True:
            chunk = f.read(_READ_CHUNK)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return FileReport(path, _read_problem(err, f"near byte {size + err.start}: "), 0, 0, complete=False)
            size += len(chunk)
            blank = blank and not text.strip()
            if not chunk:
                break
            if count.limit and not blank and size >= SAMPLE_BYTES:
                return FileReport(path, None, 1, size, complete=False)
    except (EOFError, OSError, zlib.error) as err:
        where = f"after {size} bytes: " if size else ""
        return FileReport(path, _read_problem(err, where), 0, 0, complete=False)
    return FileReport(path, None, 0 if blank else 1, size, complete=True)


def _check_array(path: str, f: IO[bytes], count: _Counter) -> FileReport:
    """One JSON array of records (or of strings) in the whole file: read whole, as the reader does."""
    try:
        records = json.loads(f.read().decode("utf-8"))
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as err:
        return count.report(path, _read_problem(err, ""), complete=False)
    except json.JSONDecodeError as err:
        problem = f"invalid JSON array (line {err.lineno}: {err.msg}); {JSON_FIX} (or one JSON array of them)"
        return count.report(path, problem, complete=False)
    if not isinstance(records, list):
        return count.report(path, f"a JSON {type(records).__name__}, not JSON lines or an array; {JSON_FIX}", False)
    for index, record in enumerate(records, 1):
        problem = None if isinstance(record, str) else _record_problem(record)
        if problem:
            return count.report(path, f"record {index}: {problem}", complete=False)
        count.add(record, 0)
    return count.report(path, None, complete=True)


def _check(path: str, limit: bool) -> FileReport:
    count = _Counter(limit)
    try:
        f = _open(path)
    except OSError as err:
        return count.report(path, f"cannot be opened ({err})", complete=False)
    with f:
        if _stem(path).endswith(".txt"):
            return _check_text(path, f, count)
        row = 0
        try:
            for raw in f:
                row += 1
                line = raw.decode("utf-8-sig" if row == 1 else "utf-8").strip()  # a leading BOM, as the reader
                if not line:
                    count.add(None, len(raw))
                    continue
                if row == 1 and line.startswith("["):
                    f.seek(0)
                    return _check_array(path, f, count)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    problem = f"row {row}: invalid JSON ({err.msg} at column {err.colno}); {JSON_FIX}"
                    return count.report(path, problem, complete=False)
                problem = _record_problem(record)
                if problem:
                    return count.report(path, f"row {row}: {problem}", complete=False)
                count.add(record, len(raw))
                if count.enough():
                    return count.report(path, None, complete=False)
        except (EOFError, OSError, zlib.error, UnicodeDecodeError) as err:
            where = f"row {row}: " if isinstance(err, UnicodeDecodeError) else (f"after row {row}: " if row else "")
            return count.report(path, _read_problem(err, where), complete=False)
    return count.report(path, None, complete=True)


def preflight(path: str) -> FileReport:
    """The first records of ``path`` (.jsonl/.json/.txt, optionally .gz) checked, and counted (module docstring)."""
    return _check(path, limit=True)


def scan(path: str) -> FileReport:
    """Every record of ``path`` checked and counted (what finds the row of an error met during a run)."""
    return _check(path, limit=False)


def has_document(path: str) -> bool:
    """Whether ``path`` (.jsonl/.json/.txt, optionally .gz) holds at least one non-empty document before its first
    content problem, if any (:func:`preflight`: the first records, and on while no document was seen)."""
    return preflight(path).documents > 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lowrank_recipes.recipes.data.file_check FILE ...``: every record of each file checked; one line per
    file; exit 1 when a file has a problem or holds no document."""
    paths = sys.argv[1:] if argv is None else argv
    failed = False
    for path in paths:
        report = scan(path)
        if report.problem or not report.documents:
            failed = True
            print(f"{path}: {report.problem or 'no document (empty, or no record with a non-empty text)'}")
        else:
            print(f"{path}: ok, {report.documents} documents, {report.text_bytes:,} bytes of text")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
