"""The conversations source: chat templates and rejected records."""

from __future__ import annotations

import json

from lmloom.data.documents import Document, Reject
from lmloom.data.sources import ConversationsSource, read_source


def split(records):
    records = list(records)
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, Reject)]


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {
    "id": "c1",
    "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
}


def test_chatml_rendering_and_meta(tmp_path):
    path = write(tmp_path / "chats.jsonl", [GOOD])
    [doc] = read_source(ConversationsSource(path=path, id_field="id"))
    assert doc.text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert (doc.id, doc.kind, doc.meta) == ("c1", "prose", {"file": "chats.jsonl", "line": 1, "turns": 2})


def test_custom_template_fills_each_placeholder_once(tmp_path):
    tricky = {"messages": [{"role": "user", "content": "say {role} and {content}"}]}
    path = write(tmp_path / "chats.jsonl", [GOOD, tricky])
    docs = list(read_source(ConversationsSource(path=path, template="### {role}: {content}\n")))
    assert docs[0].text == "### user: Hi?\n### assistant: Hello.\n"
    assert docs[1].text == "### user: say {role} and {content}\n"  # inserted text is not re-expanded


def test_bad_records_are_rejected_with_reasons(tmp_path):
    path = write(
        tmp_path / "chats.jsonl",
        [
            GOOD,
            {"messages": []},
            {"conversation": []},
            {"messages": [{"role": "user"}]},
            {"messages": [{"content": "no role"}]},
            {"messages": [{"role": "wizard", "content": "zap"}]},
            "not json",
            GOOD,
        ],
    )
    docs, rejects = split(read_source(ConversationsSource(path=path)))
    assert [d.meta["line"] for d in docs] == [1, 8]
    assert [(r.location.rsplit(":", 1)[1], r.reason) for r in rejects] == [
        ("2", "invalid-conversation"),
        ("3", "invalid-conversation"),
        ("4", "invalid-conversation"),
        ("5", "invalid-conversation"),
        ("6", "unknown-role"),
        ("7", "invalid-json"),
    ]
    assert "'wizard'" in rejects[4].detail
    # roles are configurable
    docs, _ = split(read_source(ConversationsSource(path=path, roles=["user", "assistant", "wizard"])))
    assert len(docs) == 3
