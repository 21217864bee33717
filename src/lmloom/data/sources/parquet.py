"""`parquet`: one document per row of Parquet tables, text from a chosen column.

Rows are streamed in record batches of `batch_rows` (only the text and id columns are read), never
the whole table. A file pyarrow cannot open or decode (not Parquet, truncated, a corrupt page) keeps
the rows read before the problem and is rejected as `unreadable-file` with pyarrow's words; a row
whose text is null or not a string is rejected as `missing-field` / `field-not-string`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from lmloom.data.documents import (
    FIELD_NOT_STRING,
    INVALID_UNICODE,
    MISSING_FIELD,
    Document,
    Kind,
    Reject,
    excerpt,
)
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources.jsonl import encodable
from lmloom.data.sources.reading import FileSource, list_files, read_seekable, reject_unreadable
from lmloom.data.sources.storage import GlobPatterns


class ParquetSource(FileSource):
    """One document per row; `path` is a .parquet file or a directory of them."""

    type: Literal["parquet"] = "parquet"
    text_column: str = "text"
    id_column: str | None = None  # without it (or where a row's is null) the id is "<file>:<row>"
    kind: Kind = "prose"
    batch_rows: int = Field(1024, gt=0, description="rows decoded at a time")
    patterns: GlobPatterns = Field(default_factory=lambda: ["*.parquet", "*.pq"], min_length=1)

    def file_patterns(self) -> list[str]:
        return self.patterns


def read_parquet(
    cfg: ParquetSource, notes: dict[str, Any], ledger: SourceLedger
) -> Iterator[Document | Reject]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = cfg.store()
    files = list_files(cfg, store, ledger)
    notes["files"] = len(files)
    for file in files:
        with read_seekable(store, file, ledger) as (handle, origin, problem):
            if handle is None:
                yield reject_unreadable(cfg.label, str(file), problem or "unreadable", origin)
                continue
            row = 0
            try:
                table = pq.ParquetFile(handle)
                names = table.schema_arrow.names
                if cfg.text_column not in names:
                    detail = f"no column {cfg.text_column!r} (columns: {', '.join(names[:20])})"
                    yield Reject(cfg.label, str(file), MISSING_FIELD, "", detail, origin=origin)
                    continue
                columns = [cfg.text_column] + ([cfg.id_column] if cfg.id_column in names else [])
                for batch in table.iter_batches(batch_size=cfg.batch_rows, columns=columns):
                    data = batch.to_pydict()
                    ids = data.get(cfg.id_column or "", [None] * batch.num_rows)
                    for text, doc_id in zip(data[cfg.text_column], ids, strict=True):
                        yield _row_document(cfg, file.relpath, str(file), row, text, doc_id, origin)
                        row += 1
            except (pa.ArrowException, OSError, ValueError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
                yield reject_unreadable(cfg.label, f"{file}:row {row}", detail, origin)
    ledger.finish()


def _row_document(
    cfg: ParquetSource, name: str, where: str, row: int, text: Any, doc_id: Any, origin: Any
) -> Document | Reject:
    at = f"{where}:row {row}"
    if text is None:
        return Reject(cfg.label, at, MISSING_FIELD, "", f"column {cfg.text_column!r} is null", origin=origin)
    if not isinstance(text, str):
        detail = f"column {cfg.text_column!r} holds a {type(text).__name__}, not a string"
        return Reject(cfg.label, at, FIELD_NOT_STRING, excerpt(str(text)), detail, origin=origin)
    if not encodable(text):
        return Reject(
            cfg.label, at, INVALID_UNICODE, excerpt(text), "text holds lone surrogates", origin=origin
        )
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or not encodable(str(doc_id)):
        doc_id = f"{name}:{row}"
    return Document(str(doc_id), text, cfg.kind, cfg.label, {"file": name, "row": row}, origin)
