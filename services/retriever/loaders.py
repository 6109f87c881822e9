"""Turn files into documents: .txt .md .html .pdf .json .jsonl.

A document is one or more sections (a PDF page is a section) plus metadata; its id is the sha256 of its
normalised text unless the source names one, so the same content always gets the same id. A document read
from a file remembers the file's path (`source`): re-ingesting that path replaces what it held before.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

SUPPORTED_EXTENSIONS = (".txt", ".md", ".html", ".htm", ".pdf", ".json", ".jsonl")


class UnsupportedDocument(ValueError):
    """A file the loaders cannot read: unknown extension, malformed content, or over a limit."""


@dataclass(slots=True, frozen=True)
class LoadLimits:
    """Bounds on the work one file may cost; a file over them is refused (reported per file)."""

    max_pdf_pages: int = 2000
    pdf_parse_seconds: float = 120.0


@dataclass(slots=True)
class Section:
    """A run of text that chunks never cross (a PDF page, or the whole text), with its own metadata."""

    text: str
    metadata: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class SourceDocument:
    name: str
    sections: list[Section]
    metadata: dict[str, object] = field(default_factory=dict)
    explicit_id: str | None = None
    source: str = ""  # the path of the file it came from; '' for documents sent as JSON

    @property
    def text(self) -> str:
        return "\n\n".join(section.text for section in self.sections)

    @property
    def id(self) -> str:
        return self.explicit_id or content_id(self.text)

    @property
    def fingerprint(self) -> str:
        """What decides "unchanged": the text for content-addressed ids; text and metadata for your own ids."""
        if self.explicit_id is None:
            return self.id
        payload = self.text + "\x00" + json.dumps(self.metadata, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


def normalise_text(text: str) -> str:
    """NFC, one space for runs of spaces and tabs, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v\u00a0]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def content_id(text: str) -> str:
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()


def make_document(name: str, text: str, metadata: dict[str, object] | None = None,
                  explicit_id: str | None = None, source: str = "") -> SourceDocument:
    return SourceDocument(name=name, sections=[Section(normalise_text(text))], metadata=dict(metadata or {}),
                          explicit_id=explicit_id, source=source)


class _VisibleText(HTMLParser):
    """Collects the text a browser would show, plus the <title>; drops script, style and other invisible parts."""

    _HIDDEN: ClassVar[set[str]] = {"script", "style", "noscript", "template", "head"}
    _BLOCK: ClassVar[set[str]] = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
                                  "table", "section", "article", "header", "footer", "pre", "blockquote", "hr",
                                  "dt", "dd"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._hidden_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif self._hidden_depth == 0:
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(title, visible text) of an HTML page."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    title = normalise_text(" ".join(parser.title_parts))
    return title, normalise_text("".join(parser.parts))


def file_name(name: str) -> str:
    """The last part of an uploaded file's name, whichever separator the client used ('../a/b.txt' -> 'b.txt')."""
    return Path(name.replace("\\", "/")).name or "upload"


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _records_to_documents(records: list[object], name: str, base: dict[str, object],
                          source: str) -> list[SourceDocument]:
    documents = []
    for position, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UnsupportedDocument(f"{name}: item {position} is not an object with a string 'text'")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise UnsupportedDocument(f"{name}: item {position} has non-object 'metadata'")
        explicit_id = record.get("id")
        documents.append(make_document(str(metadata.get("name", name)), record["text"],
                                       {**base, "item": position, **metadata},
                                       str(explicit_id) if explicit_id is not None else None, source))
    return documents


def load_bytes(name: str, data: bytes, source: str | None = None,
               limits: LoadLimits = LoadLimits()) -> list[SourceDocument]:
    """Documents in one file's content; `name` decides the format by its extension."""
    suffix = Path(name).suffix.lower()
    path, name = source or name, file_name(name)
    base: dict[str, object] = {"source": name, "path": path}
    if suffix in (".txt", ".md"):
        return [make_document(name, _decode(data, name), base, source=path)]
    if suffix in (".html", ".htm"):
        title, text = html_to_text(_decode(data, name))
        return [make_document(name, text, {**base, "title": title} if title else base, source=path)]
    if suffix == ".pdf":
        document = _load_pdf(name, data, base, limits)
        document.source = path
        return [document]
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(_decode(data, name).splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UnsupportedDocument(f"{name}: line {number} is not JSON ({exc.msg})") from exc
        return _records_to_documents(records, name, base, path)
    if suffix == ".json":
        try:
            payload = json.loads(_decode(data, name))
        except json.JSONDecodeError as exc:
            raise UnsupportedDocument(f"{name}: not JSON ({exc.msg})") from exc
        return _records_to_documents(payload if isinstance(payload, list) else [payload], name, base,
                                     path)
    raise UnsupportedDocument(f"{name}: unsupported file type {suffix or '(none)'}; "
                              f"supported: {' '.join(SUPPORTED_EXTENSIONS)}")


def _load_pdf(name: str, data: bytes, base: dict[str, object], limits: LoadLimits) -> SourceDocument:
    """Text per page. Encrypted files, decompression bombs, too many pages or too long a parse are refused;
    the time bound is checked between pages."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

    started = time.monotonic()
    try:
        reader = PdfReader(io.BytesIO(data))
        count = len(reader.pages)
        if count > limits.max_pdf_pages:
            raise UnsupportedDocument(f"{name}: {count} pages, over the limit of {limits.max_pdf_pages}")
        pages = []
        for page in reader.pages:
            if time.monotonic() - started > limits.pdf_parse_seconds:
                raise UnsupportedDocument(f"{name}: reading took longer than {limits.pdf_parse_seconds:g}s "
                                          f"(stopped after {len(pages)} of {count} pages)")
            contents = page.get_contents()
            if contents is not None:
                contents.get_data()  # extract_text hides a decompression bomb as an empty page: surface it
            pages.append(normalise_text(page.extract_text() or ""))
        title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    except UnsupportedDocument:
        raise
    except (FileNotDecryptedError, DependencyError) as exc:
        raise UnsupportedDocument(f"{name}: encrypted PDF, not supported ({exc})") from exc
    except LimitReachedError as exc:
        raise UnsupportedDocument(f"{name}: PDF over a decompression limit ({exc})") from exc
    except Exception as exc:  # a malformed PDF can raise almost anything from inside the parser
        raise UnsupportedDocument(f"{name}: unreadable PDF ({type(exc).__name__}: {exc})") from exc
    sections = [Section(text, {"page": number}) for number, text in enumerate(pages, start=1) if text]
    metadata = {**base, "pages": len(pages)}
    if isinstance(title, str) and title.strip():
        metadata["title"] = title.strip()
    return SourceDocument(name=name, sections=sections, metadata=metadata)


def load_file(path: Path) -> list[SourceDocument]:
    return load_bytes(path.name, path.read_bytes(), source=str(path))


def iter_supported_files(paths: list[Path]) -> list[Path]:
    """Files under the given paths whose extension a loader reads, sorted for a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        elif path.is_file() and path.suffix.lower() in SUPPORTED_EXTENSIONS:
            found.append(path)
    return found
