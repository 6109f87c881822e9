from __future__ import annotations

import json
from pathlib import Path

import pytest
from reportlab.pdfgen import canvas

from services.retriever.loaders import (
    UnsupportedDocument,
    content_id,
    html_to_text,
    iter_supported_files,
    load_bytes,
    load_file,
)


def test_text_and_markdown_keep_their_text_and_name() -> None:
    (doc,) = load_bytes("notes.md", b"# Title\n\nSome   text.\r\n")
    assert doc.text == "# Title\n\nSome text."
    assert doc.name == "notes.md"
    assert doc.metadata["source"] == "notes.md"


def test_document_id_is_the_hash_of_normalised_text() -> None:
    (a,) = load_bytes("a.txt", b"Hello   world\n")
    (b,) = load_bytes("b.txt", b"  Hello world")
    (c,) = load_bytes("c.txt", b"Hello there")
    assert a.id == b.id == content_id("Hello world")
    assert a.id != c.id


def test_html_keeps_title_and_visible_text_and_drops_script_and_style() -> None:
    html = (b"<html><head><title>Pump manual</title><style>p {color: red}</style></head>"
            b"<body><h1>Setup</h1><p>Open the valve.</p><script>alert('x')</script><p>Then &amp; only then.</p>"
            b"</body></html>")
    (doc,) = load_bytes("manual.html", html)
    assert doc.metadata["title"] == "Pump manual"
    assert "Open the valve." in doc.text and "Then & only then." in doc.text
    assert "alert" not in doc.text and "color" not in doc.text and "Pump manual" not in doc.text
    assert html_to_text("<p>a</p><p>b</p>")[1] == "a\n\nb"


def _pdf(path: Path, pages: list[str]) -> None:
    pdf = canvas.Canvas(str(path))
    for text in pages:
        pdf.drawString(72, 720, text)
        pdf.showPage()
    pdf.save()


def test_pdf_has_one_section_per_page_with_page_numbers(tmp_path: Path) -> None:
    path = tmp_path / "guide.pdf"
    _pdf(path, ["The boiler runs at 80 degrees.", "Replace the filter every month."])
    (doc,) = load_file(path)
    assert [s.metadata["page"] for s in doc.sections] == [1, 2]
    assert "80 degrees" in doc.sections[0].text and "filter every month" in doc.sections[1].text
    assert doc.metadata["pages"] == 2 and doc.metadata["source"] == "guide.pdf"


def test_broken_pdf_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedDocument, match=r"broken\.pdf"):
        load_bytes("broken.pdf", b"%PDF-1.4 this is not a pdf")


def test_json_array_and_jsonl_items_are_documents_with_ids_and_metadata() -> None:
    items = [{"text": "first", "id": "doc-1", "metadata": {"lang": "en"}}, {"text": "second"}]
    docs = load_bytes("items.json", json.dumps(items).encode())
    assert [d.id for d in docs] == ["doc-1", content_id("second")]
    assert docs[0].metadata["lang"] == "en" and docs[0].metadata["source"] == "items.json"
    lines = load_bytes("items.jsonl", b'{"text": "a"}\n\n{"text": "b", "metadata": {"k": 1}}\n')
    assert [d.text for d in lines] == ["a", "b"] and lines[1].metadata["k"] == 1


@pytest.mark.parametrize(("name", "data", "message"), [
    ("bad.jsonl", b'{"text": "a"}\nnot json\n', "line 2"),
    ("bad.json", b'[{"title": "no text"}]', "item 0"),
    ("bad.json", b'[{"text": "x", "metadata": [1]}]', "metadata"),
    ("image.png", b"\x89PNG", "unsupported file type .png"),
])
def test_bad_input_is_refused_with_the_reason(name: str, data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedDocument, match=message):
        load_bytes(name, data)


def test_walk_finds_supported_files_only(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "sub/b.md", "sub/c.png", "d.HTML"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in iter_supported_files([tmp_path])] == ["a.txt", "d.HTML", "b.md"]
