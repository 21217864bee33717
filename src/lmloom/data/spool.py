"""A scratch copy of the cleaned documents, for the steps that need the whole corpus before the
first document can be written (mixture rates, the poisoning scan) and read it more than once.

It lives in the stage's scratch directory and goes through the same codec as the run's artifacts,
so an encrypted run never leaves plaintext documents on disk; it is deleted when the stage ends.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmloom.artifacts.files import Codec
from lmloom.data.documents import Document

NAME = "spool.jsonl"


class DocumentSpool:
    def __init__(self, directory: Path, codec: Codec):
        self.path = directory / NAME
        self.path.unlink(missing_ok=True)  # a leftover of an interrupted run
        self.codec = codec
        self._writer = io.TextIOWrapper(codec.open_write(self.path, NAME), encoding="utf-8", newline="\n")
        self._origins: dict[int, Any] = {}  # the source-file records, which stay in memory
        self.count = 0

    def write(self, doc: Document) -> None:
        record = doc.to_json()
        if doc.origin is not None:
            self._origins[id(doc.origin)] = doc.origin
            record["_origin"] = id(doc.origin)
        self._writer.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close_writing(self) -> None:
        self._writer.close()

    def read(self) -> Iterator[Document]:
        with io.TextIOWrapper(self.codec.open_read(self.path, NAME), encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                origin = self._origins.get(record.pop("_origin", None))
                yield Document(
                    record["id"], record["text"], record["kind"], record["source"], record["meta"], origin
                )

    def delete(self) -> None:
        if not self._writer.closed:
            self._writer.close()
        self.path.unlink(missing_ok=True)
