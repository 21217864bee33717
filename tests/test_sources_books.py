"""The books source: whole books, chapters, max_chars parts, EPUB via ebooklib."""

from __future__ import annotations

import hashlib

from ebooklib import epub

from lmloom.data.documents import Document, Reject
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources import BooksSource, read_source
from lmloom.data.sources.books import cut

BOOK = (
    "Title: The Long Road\nAuthor: A. Writer\n\n"
    "CHAPTER I\n\nIt began on a Tuesday.\n\nThe rain fell.\n\n"
    "CHAPTER II\n\nIt ended on a Friday.\n"
)


def split(records):
    records = list(records)
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, Reject)]


def test_text_book_whole_and_split_into_chapters(tmp_path):
    (tmp_path / "road.txt").write_text(BOOK)
    [whole] = read_source(BooksSource(path=tmp_path))
    assert whole.text == BOOK and whole.meta == {
        "path": "road.txt",
        "title": "The Long Road",
        "author": "A. Writer",
    }
    docs = list(read_source(BooksSource(path=tmp_path, chapter_pattern=r"^CHAPTER [IVXLC]+$")))
    assert [(d.id, d.meta.get("chapter_title")) for d in docs] == [
        ("road.txt#ch0", None),
        ("road.txt#ch1", "CHAPTER I"),
        ("road.txt#ch2", "CHAPTER II"),
    ]
    assert docs[1].text.startswith("CHAPTER I\n") and "Friday" not in docs[1].text
    assert all(d.meta["author"] == "A. Writer" for d in docs)


def test_long_text_is_cut_at_paragraph_breaks(tmp_path):
    paragraphs = [f"Paragraph {i} " + "word " * 30 for i in range(20)]
    (tmp_path / "long.txt").write_text("\n\n".join(paragraphs))
    docs = list(read_source(BooksSource(path=tmp_path, max_chars=1000)))
    assert len(docs) > 3 and all(len(d.text) <= 1000 for d in docs)
    assert all(d.text.startswith("Paragraph") for d in docs)  # every cut fell between paragraphs
    assert [d.meta["part"] for d in docs] == list(range(len(docs)))
    assert cut("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def write_epub(path):
    book = epub.EpubBook()
    book.set_identifier("id-1")
    book.set_title("Sea Stories")
    book.add_author("B. Sailor")
    chapters = []
    for i, body in enumerate(["The ship left the harbour at dawn.", "A storm rose in the night."], 1):
        chapter = epub.EpubHtml(title=f"Chapter {i}", file_name=f"ch{i}.xhtml", lang="en")
        chapter.content = f"<html><body><h1>Chapter {i}</h1><p>{body}</p></body></html>"
        book.add_item(chapter)
        chapters.append(chapter)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = chapters
    epub.write_epub(str(path), book)
    return path


def test_epub_chapters_with_title_and_author_and_the_whole_file_in_the_ledger(tmp_path):
    path = write_epub(tmp_path / "sea.epub")
    (tmp_path / "broken.epub").write_bytes(b"PK\x03\x04 not a zip at all")
    ledger = SourceLedger("b", "books")
    docs, rejects = split(read_source(BooksSource(path=tmp_path), ledger=ledger))
    # main text of each chapter (trafilatura, favouring precision, drops the lone heading)
    assert [d.text for d in docs] == ["The ship left the harbour at dawn.", "A storm rose in the night."]
    assert docs[0].meta == {"path": "sea.epub", "title": "Sea Stories", "author": "B. Sailor", "chapter": 0,
                            "chapter_file": "ch1.xhtml"}  # fmt: skip
    assert [(r.location, r.reason) for r in rejects] == [(str(tmp_path / "broken.epub"), "unreadable-file")]
    sea = next(f for f in ledger.files if f.relpath == "sea.epub")
    assert (sea.sha256, sea.size) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)


def test_file_over_max_file_bytes_is_rejected_unread(tmp_path):
    (tmp_path / "huge.txt").write_text("x" * 5000)
    [reject] = read_source(BooksSource(path=tmp_path, max_file_bytes=1000))
    assert reject.reason == "file-too-large"
