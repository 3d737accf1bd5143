"""datatrove pipeline steps of the mix build that datatrove does not ship.

Every step counts what it does per source with ``stat_update`` keys ``<event>/<source>/<reason>``
(events: ``read``, ``quarantined``, ``dropped``, ``phi``, ``heldout``, ``tokens``, ``chunks``), which the
report adds up. Bad records never stop a job: they are written to ``errors/`` with file, line and reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.word_tokenizers import WordTokenizer

from preprocessing.phi import PHIModel, PHIModelError, Span, documents_per_batch, phi_spans, phi_spans_of, redact_phi
from preprocessing.recipe import ONE_DOCUMENT_PER_FILE, SourceConfig
from preprocessing.tokenizer import as_text, eos_id, text_tokenizer, token_dtype

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- errors


class Quarantine:
    """Per-rank error file ``<dir>/<stage>_<rank>.jsonl``, rewritten when a rank reruns (so a resumed job
    does not double-count)."""

    def __init__(self, directory: str | Path, stage: str, rank: int):
        self.path = Path(directory) / f"{stage}_{rank:05d}.jsonl"
        self._f = None

    def write(self, file: str, line: int | None, reason: str, excerpt: str = "") -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w")
        self._f.write(json.dumps({"file": file, "line": line, "reason": reason, "excerpt": excerpt[:200]}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


# ------------------------------------------------------------------------------------------ text tools

_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC, unified line ends, runs of spaces folded, at most one blank line, trimmed lines."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def latex_to_text(source: str) -> str:
    """LaTeX -> prose with pylatexenc: math kept as unicode text, citations/refs/title block/bibliography
    removed (they would only teach the model placeholders)."""
    from pylatexenc.latex2text import EnvironmentTextSpec, LatexNodes2Text, MacroTextSpec, get_default_latex_context_db

    db = get_default_latex_context_db()
    db.add_context_category(
        "neurocpt", prepend=True,
        macros=[MacroTextSpec(m, discard=True) for m in ("cite", "citep", "citet", "ref", "eqref", "label", "maketitle",
                                                               "author", "date", "thanks", "bibliographystyle", "bibliography")]
        + [MacroTextSpec("title", simplify_repl="%(1)s\n\n")],
        environments=[EnvironmentTextSpec(e, discard=True) for e in ("thebibliography", "figure", "table")],
    )
    return LatexNodes2Text(latex_context=db, math_mode="text").latex_to_text(source)


class WhitespaceWordTokenizer(WordTokenizer):
    """Word/sentence splitting for the Gopher filters and MinHash without NLTK/spaCy data files (no
    downloads at run time). Words are whitespace-separated, as the Gopher rules define them."""

    _SENT = re.compile(r"(?<=[.!?])\s+")

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in self._SENT.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"[^.!?]+[.!?]*", text)]


# -------------------------------------------------------------------------------------------- reading


def line_byte_limit(max_doc_chars: int) -> int:
    """The longest jsonl line a record whose text has ``max_doc_chars`` characters can need: JSON may escape one
    character as 12 bytes (a code point past the BMP as two ``\\uXXXX``), and 4 bytes a character more are room for
    the record's other fields. A longer line is too large without being read whole or parsed."""
    return 16 * max_doc_chars


COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # what jsonl and csv sources may be compressed with, by suffix


def compression(path: str) -> str:
    """``path``'s compression suffix (one of :data:`COMPRESSIONS`), or "" for a plain file."""
    return next((c for c in COMPRESSIONS if path.endswith(c)), "")


def uncompressed_name(path: str) -> str:
    """``path`` less its compression suffix: the name of what it holds (``notes.tsv.zst`` holds a tsv)."""
    return path[: len(path) - len(compression(path))]


def open_decompressed(path: str, **text):
    """``path`` opened for reading, decompressed by its suffix: gzip, bzip2, xz or zstd (``.zst``: how many
    pretraining corpora ship, Dolma and RedPajama among them); bytes, or text with ``text`` (``encoding`` etc., as
    ``open`` takes them)."""
    import bz2
    import gzip
    import io
    import lzma

    suffix = compression(path)
    if suffix == ".zst":
        import zstandard  # its reader has no readline: buffered, it has

        raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    else:
        raw = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)(path, "rb")
    return io.TextIOWrapper(raw, **text) if text else raw


def jsonl_records(path: str, max_line_bytes: int | None = None, lines: tuple[int, int] | None = None
                  ) -> Iterator[tuple[int, Any, str | None]]:
    """(line, record, problem) for every non-blank line of a jsonl file (compressed too: :func:`open_decompressed`);
    a line that is not UTF-8 or not JSON comes back with its problem (and an excerpt as the record) instead of
    stopping. A line of more than ``max_line_bytes`` comes back as ``too_large`` (with a message as the record)
    without being read into memory whole or parsed: a multi-GB line costs a pass over its bytes, not their size in
    memory and a JSON parse.
    ``lines`` (first, last): only those lines (numbered from 1, as :func:`count_lines` counts them); the lines before
    are read past, not parsed, and reading stops after the last."""
    import orjson

    first, last = lines or (1, None)
    with open_decompressed(path) as f:
        i = 0
        while raw := (f.readline(max_line_bytes + 1) if max_line_bytes else f.readline()):
            i += 1
            if last is not None and i > last:
                return
            if i < first:
                while max_line_bytes and raw and not raw.endswith(b"\n"):  # another task's long line: read past it
                    raw = f.readline(1 << 16)
                continue
            if max_line_bytes and len(raw.rstrip(b"\r\n")) > max_line_bytes:
                head, size = raw[:100].decode("utf-8", "replace"), len(raw)
                while raw and not raw.endswith(b"\n"):  # the rest of the line, skipped a piece at a time
                    raw = f.readline(1 << 16)
                    size += len(raw)
                yield i, f"line of {size} bytes, over the limit of {max_line_bytes} (16 bytes per max_doc_chars), " \
                         f"not parsed: {head}", "too_large"
                continue
            if not raw.strip():
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield i, f"byte {err.start}", "non_utf8"
                continue
            try:
                yield i, orjson.loads(raw), None
            except orjson.JSONDecodeError:
                yield i, raw[:1000].decode("utf-8", "replace"), "malformed_json"


def csv_records(path: str, max_field_chars: int, lines: tuple[int, int] | None = None
                ) -> Iterator[tuple[int, Any, str | None]]:
    """(row, record, problem) for every non-blank row of a csv or tsv file, compressed too (tab-separated by its name),
    the header's names as the record's keys, rows numbered from 1 after the header as :func:`csv_row_count` counts
    them: the form EHR exports come in (MIMIC's notes are csv.gz, each note across lines in one quoted field). Not
    datatrove's ``CsvReader``: there a note over the csv module's 131,072-character field limit, or a byte that is
    not UTF-8, ends the task (:class:`MixReader` says more). A row with more or fewer fields than the
    header, or with bytes that are not UTF-8, comes back with its problem and reading goes on. A file that breaks
    the CSV syntax (a stray or unclosed quote, a field of more than ``max_field_chars``) ends with a problem at the
    row where it broke: no parser can tell where the next record starts, and a guess would turn the rest of a note
    into records. ``lines``: as :func:`jsonl_records`'s, in rows."""
    import csv

    first, last = lines or (1, None)
    row, header = 0, []
    try:
        for row, fields, line in _csv_rows(path, max_field_chars):
            if row == 0:
                header = fields
            elif last is not None and row > last:
                return
            elif row < first:
                continue
            elif len(fields) != len(header):
                yield row, f"{len(fields)} fields where the header has {len(header)} (line {line}): " \
                           + ",".join(fields)[:1000], "malformed_csv"
            elif bad := _not_utf8(header, fields):
                yield row, f"{bad} (line {line})", "non_utf8"
            else:
                yield row, dict(zip(header, fields)), None
    except csv.Error as err:
        yield row + 1, f"{err}: not read past it, since the end of this record is unknown", "malformed_csv"


def _not_utf8(header: list[str], fields: list[str]) -> str:
    """Where a row's first byte that is not UTF-8 is (read as a lone surrogate), or ""."""
    for name, field in zip(header, fields):
        try:
            field.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"column {name!r}, character {err.start}"
    return ""


def _csv_rows(path: str, max_field_chars: int) -> Iterator[tuple[int, list[str], int]]:
    """(row, fields, line where the row ends) of a csv or tsv file's non-blank rows, the header as row 0; strict
    CSV (a quote inside an unquoted field is an error, not a character); a BOM before the header is dropped."""
    import csv

    csv.field_size_limit(max_field_chars)  # the module's own limit (131,072 characters) is below many a long note
    delimiter = "\t" if uncompressed_name(path).endswith(".tsv") else ","
    with open_decompressed(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        row = 0
        try:
            for fields in reader:
                if fields:
                    yield row, fields, reader.line_num
                    row += 1
        except csv.Error as err:
            raise csv.Error(f"{err} at line {reader.line_num}") from None


def csv_header(path: str) -> list[str] | None:
    """A csv or tsv file's column names, or None where it has none or cannot be read (its reader says why)."""
    import contextlib

    try:
        with contextlib.closing(_csv_rows(path, 1 << 20)) as rows:
            return next((fields for _, fields, _ in rows), None)
    except Exception:  # noqa: BLE001 - a corrupt file is the reader's to quarantine, with its error
        return None


def csv_row_count(path: str, max_field_chars: int) -> int:
    """Rows of a csv or tsv file as :func:`csv_records` numbers them: one pass of the CSV parser (the quoted fields
    of a note may hold newlines, so lines do not count rows)."""
    return max(sum(1 for _ in _csv_rows(path, max_field_chars)) - 1, 0)


def count_lines(path: str) -> int:
    """Lines of a jsonl file as :func:`jsonl_records` numbers them (a last line without its newline counts): one pass
    over the bytes, without splitting or parsing them."""
    n, end = 0, b"\n"
    with open_decompressed(path) as f:
        while block := f.read(1 << 20):
            n, end = n + block.count(b"\n"), block[-1:]
    return n + (end != b"\n")


def _size(path: str) -> int:
    """Bytes on disk, 0 for a file gone (the reader quarantines it as unreadable)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Progress:
    """A line every ``every`` seconds while a task reads (on the console, where a local build's workers log): the
    clean stage runs for hours on a large corpus, and datatrove says nothing until a task ends. Documents and
    their text, with the rate, which includes the steps after the reader (the PHI guard: the slow one); files and
    their bytes on disk, against the task's total."""

    every = 300.0

    def __init__(self, what: str, total_files: int, total_bytes: int):
        self.what, self.total_files, self.total_bytes = what, total_files, total_bytes
        self.start = self.last = time.monotonic()
        self.docs = self.chars = self.files = self.bytes = 0

    def document(self, chars: int) -> None:
        self.docs, self.chars = self.docs + 1, self.chars + chars
        if (now := time.monotonic()) - self.last >= self.every:
            self.last = now
            log.info("%s: %d documents, %.1f MB of text in %.0f s (%.2f MB/s); files done: %d of %d, %.0f of %.0f MB",
                     self.what, self.docs, self.chars / 1e6, now - self.start, self.chars / 1e6 / max(now - self.start, 1e-9),
                     self.files, self.total_files, self.bytes / 1e6, self.total_bytes / 1e6)

    def file(self, size: int) -> None:
        self.files, self.bytes = self.files + 1, self.bytes + size


def _as_text(value) -> str:
    """A field's value as ``select`` compares it with the recipe's (text): a CSV's as it is, a missing or null field
    as "", a JSON or Parquet boolean as JSON writes it ("true", not Python's "True"), a number as Python writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _unselected(record: dict, kept: dict[str, set[str]]) -> str | None:
    """The first field of a source's ``select`` whose value in ``record``, as text (:func:`_as_text`), is not one of
    those kept, or None."""
    return next((key for key, values in kept.items() if _as_text(record.get(key)) not in values), None)


class MixReader(PipelineStep):
    """Reads every source's files (jsonl, csv and tsv, compressed or not; parquet, LaTeX, plain text); files are
    shared out over the tasks by :meth:`shard`. Each document gets ``metadata.source``. Malformed lines and rows, missing text keys,
    non-UTF-8 bytes, empty or oversized records and unreadable files are quarantined and counted, and reading goes
    on. One reader rather than datatrove's per-format ones: those skip a bad jsonl line with a log warning, end the
    task at a bad csv row, and share out whole files only."""

    name = "📖 MixReader"
    type = "📖 - READER"

    def __init__(self, files: list[tuple[SourceConfig, str]], errors_dir: str, max_doc_chars: int,
                 phi_model: PHIModel | None = None):
        super().__init__()
        self.files = files
        self.errors_dir = errors_dir
        self.max_doc_chars = max_doc_chars
        self.phi_model = phi_model  # the PHI guard's model, for the excerpts of a guarded source's bad records
        # each source's select as sets (the recipe holds text only), once rather than per record
        self.selected = {source.name: {key: set(values) for key, values in source.select.items()}
                         for source, _ in files}
        folders: dict[str, list[str]] = {}
        for source, path in files:
            folders.setdefault(source.name, []).append(os.path.dirname(path))
        # a record without an id is named by its file's path below the folder that holds all of its source's files:
        # its name alone collides (one folder per arXiv paper, each a main.tex), and the folder's place is the user's
        self.roots = {name: os.path.commonpath(dirs) for name, dirs in folders.items()}

    # how files are shared out over the tasks, recorded with a build's settings: a clean stage resumed under another
    # sharding would read some records twice and others never (the runs of guarded files came in 2026-11-29; csv
    # files, read since, are shared as jsonl ones, and the text stays what the builds before them recorded)
    SHARDING = "whole files in turn; a phi_guard source's jsonl and parquet records in runs over all tasks"

    def shard(self, rank: int, world_size: int) -> list[tuple[SourceConfig, str, int, int]]:
        """This task's (source, file, part, parts): whole files in turn, as datatrove shards, except the jsonl, csv and
        parquet files of a ``phi_guard`` source, of which every task takes a part: the ``part``-th of ``parts`` runs
        of consecutive records. The guard costs about 50 times what reading a record does, and notes often come as
        one large export: kept whole, such a file ran the guard on one core whatever ``--workers`` said. Runs, not
        every n-th record: the records of a file keep their order across the tasks, which is the order the dedup
        stages keep the first copy of a duplicate by."""
        split = [(s, p) for s, p in self.files if self._split(s)]
        whole = [(s, p) for s, p in self.files if not self._split(s)]
        return [(s, p, rank, world_size) for s, p in split] + [(s, p, 0, 1) for s, p in whole[rank::world_size]]

    @staticmethod
    def _split(source: SourceConfig) -> bool:
        """Whether every task takes a part of the source's files (:meth:`shard`): a guarded source's jsonl, csv and
        parquet files, counted in lines or rows (a LaTeX or text file is one document)."""
        return source.phi_guard and source.format not in ONE_DOCUMENT_PER_FILE

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        quarantine = Quarantine(self.errors_dir, "read", rank)
        shard = self.shard(rank, world_size)
        progress = Progress(f"clean, task {rank + 1}/{world_size}", len(shard), sum(map(_size, (p for _, p, _, _ in shard))))
        try:
            for source, path, part, parts in shard:
                for doc in self._read_file(source, path, quarantine, part, parts):
                    progress.document(len(doc.text))
                    yield doc
                progress.file(_size(path))
        finally:
            quarantine.close()

    def _read_file(self, source: SourceConfig, path: str, quarantine: Quarantine, part: int = 0,
                   parts: int = 1) -> Iterator[Document]:
        def bad(line, reason, excerpt=""):
            self.stat_update(f"read/{source.name}", f"quarantined/{source.name}/{reason}")
            if source.phi_guard and excerpt:  # the errors folder travels with the mix: redacted as the documents are
                # (a long window: a name cut in two at its end could not move into the 200 characters kept)
                excerpt = redact_phi(excerpt[:1000], model=self.phi_model)
            quarantine.write(path, line, reason, excerpt)

        # a jsonl line or csv field of up to 16 bytes (characters) per max_doc_chars is read: a longer text is only
        # too_large; past that a jsonl line is skipped unread, and a csv file stops there (its parser cannot skip)
        limit = line_byte_limit(self.max_doc_chars)
        try:
            lines = None
            if parts > 1:  # this task's run of lines (rows), 1-based: (first, last)
                try:
                    n = (count_lines(path) if source.format == "jsonl" else
                         csv_row_count(path, limit) if source.format == "csv" else self._rows(path))
                    lines = (part * n // parts + 1, (part + 1) * n // parts)
                except Exception:  # unreadable (corrupt gzip, bad parquet or csv): the first task alone reads what it can
                    if part:
                        return
            if source.format == "jsonl":
                records = jsonl_records(path, limit, lines)
            elif source.format == "csv":
                records = csv_records(path, limit, lines)
            else:
                read = {"parquet": self._parquet, "latex": self._latex, "text": self._text}[source.format]
                records = read(path, source)
            for line, record, problem in records:
                if lines and not lines[0] <= line <= lines[1]:  # parquet: rows of another task
                    if line > lines[1]:
                        break
                    continue
                if problem:
                    bad(line, problem, record if isinstance(record, str) else "")
                    continue
                if isinstance(record, dict) and (unselected := _unselected(record, self.selected[source.name])):
                    self.stat_update(f"read/{source.name}", f"dropped/{source.name}/select:{unselected}")
                    continue
                text = record.get(source.text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    bad(line, "missing_text_key", json.dumps(record)[:1000] if isinstance(record, dict) else "")
                    continue
                if len(text) > self.max_doc_chars:
                    bad(line, "too_large", text[:1000])
                    continue
                text = normalize_text(text)
                if not text:
                    bad(line, "empty")
                    continue
                self.stat_update(f"read/{source.name}")
                name = os.path.relpath(path, self.roots[source.name])
                whole_file = source.format in ONE_DOCUMENT_PER_FILE
                doc_id = str(record.get(source.id_key) or (os.path.splitext(name)[0] if whole_file else f"{name}:{line}"))
                yield Document(text=text, id=f"{source.name}/{doc_id}",
                               metadata={"source": source.name, "file": path, "line": line})
        except Exception as err:  # unreadable file: corrupt gzip, bad parquet, permissions
            bad(None, "unreadable_file", f"{type(err).__name__}: {err}")

    @staticmethod
    def _rows(path: str) -> int:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows

    @staticmethod
    def _parquet(path: str, source: SourceConfig):
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                i += 1
                yield i, row, None

    @staticmethod
    def _latex(path: str, source: SourceConfig):
        raw = Path(path).read_bytes()
        try:
            tex = raw.decode("utf-8")
        except UnicodeDecodeError:
            tex = raw.decode("latin-1")  # old arXiv sources; LaTeX itself is ASCII
        yield 1, {source.text_key: latex_to_text(tex)}, None  # one document, named by its path (see __init__)

    def _text(self, path: str, source: SourceConfig):
        """A plain text file as one document (a note per file, as many clinical exports and corpora come), UTF-8; a
        file of more than 4 bytes per ``max_doc_chars`` is too large without being read."""
        if (size := _size(path)) > 4 * self.max_doc_chars:
            yield 1, f"file of {size} bytes, over 4 bytes per max_doc_chars: not read", "too_large"
            return
        raw = Path(path).read_bytes()
        try:
            yield 1, {source.text_key: raw.decode("utf-8")}, None
        except UnicodeDecodeError as err:
            yield 1, f"byte {err.start}", "non_utf8"


# ------------------------------------------------------------------------------------------ PHI guard

class PHIGuard(PipelineStep):
    """Residual identifiers in sources with ``phi_guard`` (every Safe Harbor kind, :mod:`preprocessing.phi`, and
    ``phi_model``'s finds): replaced by typed placeholders (default) or the document dropped, counted per kind."""

    name = "🛡 PHI guard"
    type = "🔻 - FILTER"

    def __init__(self, sources: list[SourceConfig], phi_model: PHIModel | None = None):
        super().__init__()
        self.policy = {s.name: s.phi_policy for s in sources if s.phi_guard}
        self.phi_model = phi_model

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        # with a model, a batch of documents at a time: its pipeline takes all their chunks in passes of its batch size
        size, data = documents_per_batch(self.phi_model), iter(data)
        while batch := list(itertools.islice(data, size)):
            guarded = [doc for doc in batch if doc.metadata["source"] in self.policy]
            with self.track_time("batch" if size > 1 else None):  # datatrove's timing is per call: per document
                found = iter(self._spans(guarded))
            for doc in batch:
                source = doc.metadata["source"]
                if source not in self.policy:
                    yield doc
                    continue
                spans = next(found)
                for kind, n in Counter(s.kind for s in spans).items():
                    self.stat_update(f"phi/{source}/{kind}", value=n)
                if spans and self.policy[source] == "drop":
                    self.stat_update(f"dropped/{source}/phi")
                    continue
                if spans:
                    doc.text = redact_phi(doc.text, spans)
                yield doc

    def _spans(self, docs: list[Document]) -> list[list[Span]]:
        """Each document's identifiers; where the model fails on a batch, the document it fails on is named."""
        try:
            return phi_spans_of([doc.text for doc in docs], self.phi_model)
        except PHIModelError as err:
            for doc in docs:
                try:
                    phi_spans(doc.text, self.phi_model)
                except PHIModelError as alone:
                    raise PHIModelError(f"source {doc.metadata['source']}, document {doc.id}: {alone}") from alone
            names = ", ".join(f"{doc.metadata['source']}/{doc.id}" for doc in docs)
            raise PHIModelError(f"documents {names} (each alone passes): {err}") from err


# --------------------------------------------------------------------------------- decontamination


def word_ngrams(text: str, n: int) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def benchmark_texts(paths: list[str]) -> Iterator[str]:
    """Every string field of every record in the benchmark jsonl files (questions, options, answers). A line
    that is not a JSON record stops the build, named: skipping it would let that question's text through."""
    from preprocessing.errors import BuildError

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    for path in paths:
        for line, record, problem in jsonl_records(path):
            if problem:
                raise BuildError(f"decontaminate: {path}:{line}: not a JSON record ({problem})")
            yield from strings(record)


class Decontaminate(PipelineStep):
    """Drops documents sharing any word ``n``-gram (13 by default) with a listed benchmark record."""

    name = "🧪 Decontaminate"
    type = "🔻 - FILTER"

    def __init__(self, benchmark_files: list[str], n: int = 13):
        super().__init__()
        self.files, self.n = benchmark_files, n
        self._index: set[int] | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self._index is None:
            self._index = set().union(*(word_ngrams(t, self.n) for t in benchmark_texts(self.files)))
        for doc in data:
            if self._index and not self._index.isdisjoint(word_ngrams(doc.text, self.n)):
                self.stat_update(f"dropped/{doc.metadata['source']}/benchmark_overlap")
                continue
            yield doc


# ------------------------------------------------------------------------------------------ filters


class SourceFilters(PipelineStep):
    """Runs each source's own datatrove filters (Gopher quality/repetition, minimum length) and counts
    every drop under the filter's own reason."""

    name = "🔻 Source filters"
    type = "🔻 - FILTER"

    def __init__(self, sources: list[SourceConfig]):
        super().__init__()
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

        words = WhitespaceWordTokenizer()
        self.filters: dict[str, list[tuple[str, object]]] = {}
        for s in sources:
            chain = []
            if s.filters.gopher_quality is not None:
                chain.append(("gopher_quality", GopherQualityFilter(language=words, **s.filters.gopher_quality)))
            if s.filters.gopher_repetition is not None:
                chain.append(("gopher_repetition", GopherRepetitionFilter(language=words, **s.filters.gopher_repetition)))
            self.filters[s.name] = chain
        self.min_chars = {s.name: s.filters.min_chars for s in sources}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            source = doc.metadata["source"]
            reason = "too_short" if len(doc.text) < self.min_chars[source] else None
            for name, f in self.filters[source] if reason is None else ():
                with self.track_time():
                    verdict = f.filter(doc)
                keep, why = (verdict, None) if isinstance(verdict, bool) else verdict
                if not keep:
                    reason = f"{name}:{why or 'rejected'}"
                    break
            if reason:
                self.stat_update(f"dropped/{source}/{reason}")
                continue
            yield doc


class CountBySource(PipelineStep):
    """Counts documents passing this point per source as ``<label>/<source>`` (for dedup accounting)."""

    name = "🔢 Count"
    type = "📊 - STATS"

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(f"{self.label}/{doc.metadata['source']}")
            yield doc


class CheckSurvivors(PipelineStep):
    """First step of the stage after one that can remove every document of a source: on Slurm the stages run as
    chained jobs, so this job stops with the build's own message (:func:`preprocessing.report.check_survivors`)
    instead of datatrove's 'No files found', and the jobs after it never start."""

    name = "🚦 Survivors"
    type = "📊 - STATS"

    def __init__(self, recipe, done: list[str]):
        super().__init__()
        self.recipe, self.done = recipe, done

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from preprocessing.report import check_survivors

        check_survivors(self.recipe, self.done, report=rank == 0)
        yield from data or ()


# ------------------------------------------------------------------------------ held-out + tokenising


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class HeldoutSplit(PipelineStep):
    """Moves a deterministic ``fraction`` of each source's documents (by id hash) to held-out jsonl. A synthetic
    document (an LLM expansion, with ``metadata.parent_id``) follows its parent's draw; with a held-out parent it
    is dropped and counted, so no text derived from a held-out document is trained on, or evaluated on."""

    name = "✂ Held-out split"
    type = "🔻 - FILTER"

    def __init__(self, output_dir: str, fraction: float, seed: int):
        super().__init__()
        self.output_dir, self.fraction, self.seed = output_dir, fraction, seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        files: dict[str, object] = {}
        try:
            for doc in data:
                source, parent = doc.metadata["source"], doc.metadata.get("parent_id")
                if is_heldout(parent or doc.id, self.fraction, self.seed):
                    if parent:
                        self.stat_update(f"dropped/{source}/synthetic_of_heldout")
                        continue
                    if source not in files:
                        path = Path(self.output_dir) / source / f"{rank:05d}.jsonl"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        files[source] = open(path, "w")
                    files[source].write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
                    self.stat_update(f"heldout/{source}")
                    continue
                yield doc
        finally:
            for f in files.values():
                f.close()


def chunk_tokens(ids: list[int], eos: int, seq_length: int, overlap: int) -> Iterator[list[int]]:
    """The document's tokens + EOS, in pieces of at most ``seq_length`` tokens (each ending with EOS) that
    overlap by ``overlap`` tokens."""
    body = seq_length - 1
    if len(ids) <= body:
        yield ids + [eos]
        return
    if not 0 <= overlap < body:
        raise ValueError(f"chunk_overlap {overlap} must be in [0, {body})")
    start = 0
    while True:
        piece = ids[start : start + body]
        yield piece + [eos]
        if start + body >= len(ids):
            return
        start += body - overlap


class MegatronTokenWriter(PipelineStep):
    """Tokenises with the user's HF fast tokenizer (batched, in Rust) and writes megatron-core indexed
    datasets per source and rank with ``IndexedDatasetBuilder``; every document (chunk) ends with EOS."""

    name = "🧮 Megatron tokens"
    type = "✍ - WRITER"

    def __init__(self, output_dir: str, tokenizer_dir: str, seq_length: int, overlaps: dict[str, int], batch_size: int = 512):
        super().__init__()
        self.output_dir = output_dir
        self.tokenizer, self.eos = text_tokenizer(tokenizer_dir), eos_id(tokenizer_dir)  # once, shipped to workers
        self.seq_length, self.overlaps, self.batch_size = seq_length, overlaps, batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from datatrove.utils.batching import batched
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        tok, eos = as_text(self.tokenizer), self.eos
        dtype = token_dtype(tok.get_vocab_size())
        builders: dict[str, IndexedDatasetBuilder] = {}
        for batch in batched(data, self.batch_size):
            with self.track_time(unit="batch"):
                encodings = tok.encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encodings):
                source = doc.metadata["source"]
                if source not in builders:
                    prefix = Path(self.output_dir) / source / f"{rank:05d}"
                    prefix.parent.mkdir(parents=True, exist_ok=True)
                    builders[source] = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
                for piece in chunk_tokens(enc.ids, eos, self.seq_length, self.overlaps.get(source, 0)):
                    builders[source].add_document(np.asarray(piece, dtype=dtype), [len(piece)])
                    self.stat_update(f"tokens/{source}", value=len(piece))
                    self.stat_update(f"chunks/{source}")
                self.stat_update(f"kept/{source}")
                yield doc
        for source, builder in builders.items():
            builder.finalize(str(Path(self.output_dir) / source / f"{rank:05d}.idx"))


def merge_indexed(parts: list[Path], out_prefix: Path, dtype, documents: int, tokens: int) -> None:
    """Concatenate per-rank indexed datasets into ``out_prefix.{bin,idx}``, written under temporary
    names and renamed, so a reader never sees half a dataset, nor one whose ``documents`` and ``tokens``
    differ from what the stages counted (a stale or missing part) under a report that says otherwise."""
    import os

    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from preprocessing.errors import BuildError

    tmp = out_prefix.with_name(f".{out_prefix.name}.tmp")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    for part in parts:
        builder.add_index(str(part.with_suffix("")))
    builder.finalize(f"{tmp}.idx")
    merged = IndexedDataset(str(tmp))  # referenced while its lengths are read: they are in an mmap it closes
    found = (len(merged.sequence_lengths), int(merged.sequence_lengths.sum()))
    del merged
    if found != (documents, tokens):
        for ext in (".bin", ".idx"):
            os.remove(f"{tmp}{ext}")
        raise BuildError(f"{out_prefix}.bin: merging {len(parts)} parts gives {found[0]} documents and {found[1]} tokens, "
                         f"the stages counted {documents} and {tokens}; rebuild with --clean")
    for ext in (".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{out_prefix}{ext}")
