"""The JSONL metric sink every stage writes to (one object per line: step, name -> value)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class JsonlMetrics:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run redoes those steps and logs them again)."""
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def _plain(value: Any) -> Any:
    # numpy and torch scalars become plain numbers; floats keep full precision (resume is compared exactly)
    return value.item() if hasattr(value, "item") else value
