from __future__ import annotations

import json
from pathlib import Path

import pytest
from reportlab.pdfgen import canvas

from services.retriever.loaders import (
    LoadLimits,
    UnsupportedDocument,
    content_id,
    file_name,
    html_to_text,
    iter_supported_files,
    load_bytes,
    load_file,
    make_document,
)
from tests.support.bad_pdfs import aes_encrypted_pdf, decompression_bomb_pdf, text_pdf


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


@pytest.mark.parametrize(("make", "reason"), [(decompression_bomb_pdf, "decompression limit"),
                                              (aes_encrypted_pdf, "encrypted")], ids=["bomb", "aes"])
def test_a_pdf_bomb_or_an_aes_encrypted_pdf_is_refused_as_unsupported(make: object, reason: str) -> None:
    with pytest.raises(UnsupportedDocument) as error:
        load_bytes("bad.pdf", make())  # type: ignore[operator]
    assert "bad.pdf" in str(error.value) and reason in str(error.value)


def test_pdf_pages_and_parse_time_are_bounded() -> None:
    long = text_pdf(*(f"Page {n} of the long report." for n in range(1, 13)))
    with pytest.raises(UnsupportedDocument, match="12 pages, over the limit of 10"):
        load_bytes("long.pdf", long, limits=LoadLimits(max_pdf_pages=10))
    with pytest.raises(UnsupportedDocument, match="longer than 0s"):
        load_bytes("long.pdf", long, limits=LoadLimits(pdf_parse_seconds=0))
    (document,) = load_bytes("long.pdf", long, limits=LoadLimits(max_pdf_pages=12))
    assert len(document.sections) == 12


def test_path_like_file_names_keep_only_their_last_part_and_the_path_is_the_source() -> None:
    assert file_name("../../etc/passwd.txt") == "passwd.txt"
    assert file_name("..\\..\\windows\\win.ini.txt") == "win.ini.txt"
    (document,) = load_bytes("../../etc/notes.txt", b"Some notes.")
    assert document.name == "notes.txt" and document.metadata["source"] == "notes.txt"
    assert document.source == document.metadata["path"] == "../../etc/notes.txt"


def test_fingerprint_is_the_content_id_or_for_own_ids_text_and_metadata() -> None:
    plain = make_document("a.txt", "Same text.", {"k": 1})
    assert plain.fingerprint == plain.id == make_document("b.txt", "Same text.", {"k": 2}).fingerprint
    own = make_document("a.txt", "Same text.", {"k": 1}, explicit_id="doc-1")
    assert own.fingerprint != make_document("a.txt", "Same text.", {"k": 2}, explicit_id="doc-1").fingerprint
    assert own.fingerprint != make_document("a.txt", "New text.", {"k": 1}, explicit_id="doc-1").fingerprint
    assert own.fingerprint == make_document("z.txt", "Same  text.", {"k": 1}, explicit_id="doc-1").fingerprint
