"""HTML and Markdown in text-dir, the main-text extractor, and WARC crawls."""

from __future__ import annotations

import hashlib
from io import BytesIO

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from lmloom.data.documents import Document, Reject
from lmloom.data.html import extract_main_text
from lmloom.data.provenance import SourceLedger
from lmloom.data.sources import TextDirSource, WarcSource, read_source
from lmloom.errors import IntegrityError

ARTICLE = (
    "<html><head><title>T</title><script>var tracking = 1;</script></head><body>"
    "<nav><a href='/'>Home</a> | <a href='/about'>About us</a></nav>"
    "<article><h1>Rivers of the north</h1>"
    + "".join(
        f"<p>Paragraph {i}: the river bends past the old mill and runs on to the sea.</p>" for i in range(6)
    )
    + "</article><footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>"
)


def split(records):
    records = list(records)
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, Reject)]


def test_extract_main_text_drops_boilerplate_and_falls_back_for_tiny_pages():
    text = extract_main_text(ARTICLE)
    assert "the river bends" in text and "Paragraph 5" in text
    assert "Copyright" not in text and "About us" not in text and "tracking" not in text
    assert (
        extract_main_text("<html><body><div>just a line</div><script>x()</script></body></html>")
        == "just a line"
    )
    assert extract_main_text("<html><script>only code</script></html>") is None
    assert extract_main_text("") is None


def test_text_dir_reads_html_main_text_and_markdown_as_is(tmp_path):
    (tmp_path / "page.html").write_text(ARTICLE)
    (tmp_path / "empty.htm").write_text("<html><body><script>x()</script></body></html>")
    (tmp_path / "notes.md").write_text("# Title\n\n*as is*\n")
    cfg = TextDirSource(path=tmp_path, patterns=["*.html", "*.htm", "*.md"])
    docs, rejects = split(read_source(cfg))
    assert [(d.id, d.meta.get("format")) for d in docs] == [("notes.md", "markdown"), ("page.html", "html")]
    assert docs[0].text == "# Title\n\n*as is*\n"
    assert "Paragraph 0" in docs[1].text and "<p>" not in docs[1].text and "Copyright" not in docs[1].text
    assert [(r.location, r.reason) for r in rejects] == [(str(tmp_path / "empty.htm"), "no-main-text")]


def write_warc(path, compress):
    buffer = BytesIO()
    writer = WARCWriter(buffer, gzip=compress)

    def response(url, body, content_type="text/html; charset=utf-8", status="200 OK"):
        http = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
        record = writer.create_warc_record(
            url, "response", payload=BytesIO(body), http_headers=http,
            warc_headers_dict={"WARC-Date": "2024-05-01T12:00:00Z"},
        )  # fmt: skip
        writer.write_record(record)

    writer.write_record(writer.create_warcinfo_record("crawl.warc", {"software": "test"}))
    response("https://example.com/rivers", ARTICLE.encode())
    response("https://example.com/logo.png", b"\x89PNG\r\n", content_type="image/png")
    response("https://example.com/empty", b"<html><body><script>x()</script></body></html>")
    response("https://example.com/latin", "<p>Café crème, s'il vous plaît.</p>".encode("latin-1"),
             content_type="text/html; charset=iso-8859-1")  # fmt: skip
    response("https://example.com/gone", b"<p>not found</p>", status="404 Not Found")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize("name", ["crawl.warc", "crawl.warc.gz"])
def test_warc_html_responses_become_main_text_with_meta(tmp_path, name):
    path = write_warc(tmp_path / name, compress=name.endswith(".gz"))
    notes: dict = {}
    ledger = SourceLedger("w", "warc")
    docs, rejects = split(read_source(WarcSource(path=path), notes, ledger))
    assert [d.meta["url"] for d in docs] == ["https://example.com/rivers", "https://example.com/latin"]
    assert "the river bends" in docs[0].text and "Copyright" not in docs[0].text
    assert docs[1].text == "Café crème, s'il vous plaît."  # the declared charset was honoured
    assert docs[0].meta["date"] == "2024-05-01T12:00:00Z"
    assert docs[0].meta["content_type"].startswith("text/html")
    assert docs[0].id.startswith("<urn:uuid:")
    assert [(r.reason, r.excerpt) for r in rejects] == [("no-main-text", "https://example.com/empty")]
    assert notes["skipped"] == {"not-html": 1, "status-404": 1, "warcinfo-record": 1}
    [entry] = ledger.files
    assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_warc_keeps_earlier_pages_and_pins_apply(tmp_path):
    good = write_warc(tmp_path / "a.warc.gz", compress=True)
    data = good.read_bytes()
    # the good records, then a member with a gzip header and a corrupt deflate stream: cutting the
    # file at a byte offset instead would depend on where the (time-stamped) records compress to
    (tmp_path / "b.warc.gz").write_bytes(data + b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 64)
    docs, rejects = split(read_source(WarcSource(path=tmp_path)))
    files = [d.meta["file"] for d in docs]
    assert files.count("a.warc.gz") == 2 and files.count("b.warc.gz") == 2  # pages before the damage
    assert "unreadable-file" in [r.reason for r in rejects]
    with pytest.raises(IntegrityError, match="does not match its pin"):
        list(read_source(WarcSource(path=tmp_path, pins={"a.warc.gz": "0" * 64})))
