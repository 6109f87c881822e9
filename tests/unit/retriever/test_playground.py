"""The web playground's serving and its safety rules: open without the key, a strict CSP, no inline code.

The browser itself is driven in tests/e2e/test_playground_browser.py; these checks need no browser.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from common.service import guarded
from services.retriever.app import build_app
from services.retriever.playground import CONTENT_SECURITY_POLICY, STATIC_DIR
from services.retriever.settings import RetrieverSettings

SCRIPTS = sorted((STATIC_DIR / "js").glob("*.js"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = RetrieverSettings(api_key="secret", data_dir=tmp_path_factory.mktemp("data"))
    # No `with`: the lifespan (index, dependency watcher) is not needed to serve files.
    return TestClient(guarded(build_app(settings), settings))


@pytest.mark.parametrize(("path", "kind"), [("/", "text/html"), ("/ui/js/main.js", "javascript"),
                                            ("/ui/playground.css", "text/css"), ("/ui/favicon.svg", "image/svg")])
def test_page_and_assets_are_served_without_the_key_under_the_policy(client: TestClient, path: str,
                                                                      kind: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 200 and kind in reply.headers["content-type"]
    assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert reply.headers["x-content-type-options"] == "nosniff"


def test_the_api_still_needs_the_key(client: TestClient) -> None:
    assert client.get("/v1/collections").status_code == 401
    assert client.get("/ui/../settings.py").status_code in (401, 404)
    assert client.get("/ui/missing.js").status_code == 404


def test_policy_allows_our_origin_only() -> None:
    directives = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src", "img-src"):
        assert directives[name] == "'self'", name
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.references: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.problems += [f"<{tag} {name}=...>" for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            self._in_script = True
            if not named.get("src"):
                self.problems.append("<script> without src")
        self.references += [named[a] or "" for a in ("src", "href") if a in named and tag in ("script", "link")]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("inline script")


def test_the_page_has_no_inline_code_and_every_asset_is_ours() -> None:
    parser = _PageParser()
    parser.feed((STATIC_DIR / "index.html").read_text())
    assert parser.problems == []
    assert parser.references and all(ref.startswith("ui/") for ref in parser.references)
    assert all((STATIC_DIR / ref.removeprefix("ui/")).is_file() for ref in parser.references)


def test_scripts_build_the_page_from_text_and_import_only_local_modules() -> None:
    for script in SCRIPTS:
        source = script.read_text()
        # Untrusted strings (answers, document text) must never be parsed as markup or code.
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "setTimeout(\"", "setAttribute(\"on"):
            assert sink not in source, f"{script.name} uses {sink}"
        for module in re.findall(r'from "([^"]+)"', source):
            assert module.startswith("./") and (script.parent / module).is_file(), f"{script.name}: {module}"


def test_nothing_is_loaded_from_another_host() -> None:
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), path.name


def test_static_folder_holds_only_the_page() -> None:
    assert {p.suffix for p in STATIC_DIR.rglob("*") if p.is_file()} <= {".html", ".css", ".js", ".svg"}
