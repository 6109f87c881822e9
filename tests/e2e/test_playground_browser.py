"""The web playground in a real headless Chromium, against the real four-service stack on loopback.

One scenario, in order, as a user would go: API key prompt; create a collection; upload examples/docs plus files
that must fail one by one (broken PDF, unsupported type, too large); settings kept across a reload; ask the demo
question and watch the answer stream in; open citation 1; search-only view with scores and pages; a document
holding `<script>` stays text; delete a document and see it gone from search; stop the llm and see the banner.

Chromium and chromedriver come from Debian (`.ci/run` installs them). Without them the test is skipped, except
under CI, where that is a failure. A screenshot is taken at each step, into $PLAYGROUND_SCREENSHOTS if set
(docs/playground-*.png were made that way), else into the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from reportlab.pdfgen import canvas

from tests.support.processes import ServiceProcess, running_stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "playground-test-key"
QUESTION = "How many litres does the Aurora X2 water tank hold?"  # scripts/demo.py's question
MAX_BODY_BYTES = 256 * 1024
UNSAFE_TEXT = ("# Firmware release notes\n\nVersion 7 of the Kestrel thermostat firmware fixes the schedule editor. "
               "<script>window.__xss = 1</script> <img src=x id=injected> "
               "<b>bold</b> must show as typed.\n")


def _browser_binaries() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = "chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    _browser_binaries()
    env = {"API_KEY": API_KEY, "RETRIEVER_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with running_stack(tmp_path_factory.mktemp("playground"), env) as processes:
        yield processes


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--force-device-scale-factor=1", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.command_executor.client_config.timeout = 600  # not 120 s: a loaded 2-core CI box starves the browser
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def upload_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    files = {path.name: path for path in sorted((ROOT / "examples" / "docs").iterdir())}
    pdf = folder / "router-guide.pdf"
    page = canvas.Canvas(str(pdf))
    page.drawString(72, 720, "Netlink router quick start: plug in the power and wait for the green light.")
    page.showPage()
    page.drawString(72, 720, "Reset the Netlink router by holding the recessed button for ten seconds.")
    page.showPage()
    page.save()
    files[pdf.name] = pdf
    for name, data in {"broken.pdf": b"%PDF-1.7\nthis is not really a PDF\n",
                       "photo.png": b"\x89PNG\r\n\x1a\n not a document",
                       "huge-log.txt": b"log line\n" * (MAX_BODY_BYTES // 9 + 1000)}.items():
        (folder / name).write_bytes(data)
        files[name] = folder / name
    return files


class Page:
    """What the test does on the page, in the user's terms."""

    def __init__(self, driver: object, url: str, shots: Path) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.shots = driver, url, shots
        self.wait = lambda timeout=60: WebDriverWait(driver, timeout, poll_frequency=0.2)

    def find(self, css: str) -> object:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def until(self, condition: object, timeout: float = 60, message: str = "") -> object:
        return self.wait(timeout).until(lambda _: condition(), message)

    def shot(self, name: str) -> None:
        self.js("window.scrollTo(0, 0)")  # the status line and banner are at the top
        self.driver.save_screenshot(str(self.shots / f"playground-{name}.png"))

    def js(self, script: str, *args: object) -> object:
        return self.driver.execute_script(script, *args)

    def type_into(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def accept_confirm(self) -> str:
        alert = self.wait(10).until(lambda d: d.switch_to.alert)
        text = alert.text
        alert.accept()
        return text

    def search(self, query: str) -> list:
        from selenium.webdriver.common.keys import Keys

        self.find("input[name=mode][value=search]").click()
        self.type_into("#question", query)
        self.js("document.getElementById('results').replaceChildren()")
        self.find("#question").send_keys(Keys.ENTER)
        self.until(lambda: self.find("#results").get_attribute("aria-busy") == "false" and self.all("#results p"),
                   message=f"search for {query!r} did not finish")
        return self.all("#results .hit")


@pytest.fixture(scope="module")
def page(stack: dict[str, ServiceProcess], browser: object, tmp_path_factory: pytest.TempPathFactory) -> Page:
    shots = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    return Page(browser, stack["retriever"].url, shots)


def test_page_is_served_with_a_strict_policy(stack: dict[str, ServiceProcess]) -> None:
    import httpx

    url = stack["retriever"].url
    for path in ("/", "/ui/js/main.js", "/ui/playground.css"):
        reply = httpx.get(url + path)  # no key: the page and its assets hold no data
        assert reply.status_code == 200, (path, reply.text)
        policy = reply.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe" not in policy
        assert reply.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(url + "/v1/collections").status_code == 401


def test_scenario(page: Page, stack: dict[str, ServiceProcess], upload_files: dict[str, Path]) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.keys import Keys

    # 0. The server has an API key: the page asks for it, refuses a wrong one, keeps the right one per tab only.
    page.driver.get(page.url + "/")
    page.until(lambda: page.find("#key-dialog").get_attribute("open") is not None, message="no key prompt")
    page.type_into("#api-key", "wrong-key")
    page.find("#api-key").send_keys(Keys.ENTER)
    page.until(lambda: "refused" in page.find("#key-error").text, message="a wrong key was not refused")
    page.shot("0-key")
    page.type_into("#api-key", API_KEY)
    page.find("#api-key").send_keys(Keys.ENTER)
    page.until(lambda: page.find("#key-dialog").get_attribute("open") is None, message="the key was not accepted")
    assert page.js("return sessionStorage.getItem('rag-playground.api-key')") == API_KEY
    assert API_KEY not in page.js("return JSON.stringify(localStorage)")

    # Every control has a name a screen reader can say.
    unlabelled = page.js("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
          .map(e => e.outerHTML.slice(0, 80));""")
    assert unlabelled == []

    # 1. Create a collection (and delete one, which asks first).
    page.type_into("#collection-name", "scratch")
    page.find("#collection-name").send_keys(Keys.ENTER)
    page.until(lambda: page.all("#collection-list li[data-collection=scratch]"), message="collection not created")
    page.find("#collection-list li[data-collection=scratch] button.danger").click()
    assert "scratch" in page.accept_confirm()
    page.until(lambda: not page.all("#collection-list li[data-collection=scratch]"), message="collection not deleted")
    page.type_into("#collection-name", "demo")
    page.find("#collection-name").send_keys(Keys.ENTER)
    page.until(lambda: page.all("#collection-list li[data-collection=demo] button[aria-pressed=true]"),
               message="collection not created")
    assert page.find("#scope input[value=demo]").is_selected()
    page.shot("1-collection")

    # 2. Upload examples/docs and friends through the file input, and one file by drag and drop; each file's row
    # goes through its own states (its progress bar shows while it uploads).
    page.js("""
        window.__states = {};
        new MutationObserver(records => records.forEach(r => {
          const file = r.target.dataset && r.target.dataset.file;
          if (file) (window.__states[file] = window.__states[file] || []).push(r.target.dataset.state);
        })).observe(document.getElementById('upload-list'),
                    {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
        """)
    page.find("#file-input").send_keys("\n".join(str(path) for path in upload_files.values()))
    page.js("""
        const drop = new DataTransfer();
        drop.items.add(new File([arguments[0]], 'release-notes.md', {type: 'text/markdown'}));
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: drop, bubbles: true}));
        """, UNSAFE_TEXT)
    expected_rows = len(upload_files) + 1
    page.until(lambda: len(page.all(".upload[data-state=done], .upload[data-state=error]")) == expected_rows,
               timeout=300, message="uploads did not finish")
    outcome = {row.get_attribute("data-file"): (row.get_attribute("data-state"), row.text)
               for row in page.all(".upload")}
    assert outcome["broken.pdf"][0] == "error" and "unreadable PDF" in outcome["broken.pdf"][1]
    assert outcome["photo.png"][0] == "error" and "unsupported" in outcome["photo.png"][1]
    assert outcome["huge-log.txt"][0] == "error" and "larger" in outcome["huge-log.txt"][1]
    good = sorted(name for name, (state, _) in outcome.items() if state == "done")
    assert good == sorted([*(p.name for p in (ROOT / "examples" / "docs").iterdir()), "router-guide.pdf",
                           "release-notes.md"]), outcome
    page.until(lambda: len(page.all("#document-list li")) == len(good), message="document list not refreshed")
    states = page.js("return window.__states")
    assert states["router-guide.pdf"] == ["uploading", "indexing", "done"], states
    assert states["broken.pdf"][0] == "uploading" and states["broken.pdf"][-1] == "error", states
    page.shot("2-upload")

    # Settings survive a reload (local storage); the key does too (session storage, same tab).
    page.find("#settings-panel summary").click()
    page.type_into("#max-tokens", "48")
    page.type_into("#top-k", "3")
    page.find("#max-tokens").send_keys(Keys.TAB)
    page.driver.refresh()
    page.until(lambda: page.all("#collection-list li[data-collection=demo]"), message="page did not come back")
    assert page.find("#max-tokens").get_attribute("value") == "48"
    assert page.find("#top-k").get_attribute("value") == "3"
    assert page.find("#key-dialog").get_attribute("open") is None
    page.until(lambda: len(page.all("#document-list li")) == len(good), message="documents not listed again")
    listed = [row.get_attribute("data-document-name") for row in page.all("#document-list li")]
    assert sorted(listed) == good  # each once, however many refreshes overlapped

    # 3. Ask the demo question (Enter sends) and watch the answer grow event by event.
    page.js("""
        window.__lengths = [];
        new MutationObserver(() => {
          const answer = document.querySelector('#conversation .turn.assistant:last-child .answer');
          if (answer) window.__lengths.push(answer.textContent.length);
        }).observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true});
        """)
    page.type_into("#question", QUESTION)
    page.find("#question").send_keys(Keys.ENTER)
    page.until(lambda: page.all(".answer[data-state=streaming]"), message="no answer started")
    page.until(lambda: page.all(".answer[data-state=done], .answer[data-state=error]"), timeout=300,
               message="the answer did not finish")
    answer = page.find(".answer")
    assert answer.get_attribute("data-state") == "done", answer.text
    assert "1.8" in answer.text, answer.text
    lengths = [n for n in page.js("return window.__lengths") if n > 0]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew in steps, never shrank
    page.shot("3-answer")

    # 4. Citation 1 opens its source excerpt, with the document name; Escape closes it.
    page.find(".sources button.citation[data-citation='1']").click()
    page.until(lambda: page.find("#excerpt").get_attribute("open") is not None, message="excerpt did not open")
    assert "aurora-x2-manual.md" in page.find("#excerpt-title").text
    assert "holds 1.8 litres" in page.find("#excerpt-text").text
    assert "score" in page.find("#excerpt-meta").text
    page.shot("4-citation")
    page.find("#excerpt-close").send_keys(Keys.ESCAPE)
    page.until(lambda: page.find("#excerpt").get_attribute("open") is None, message="excerpt did not close")

    # Sources only: ranked chunks with scores; a PDF chunk says its page; opened from the keyboard.
    hits = page.search("How do I reset the Netlink router?")
    assert hits and hits[0].get_attribute("data-document-name") == "router-guide.pdf"
    assert "page 2" in hits[0].text and "score" in hits[0].text
    page.shot("5-sources")
    hits[0].find_element("css selector", "button").send_keys(Keys.ENTER)
    page.until(lambda: page.find("#excerpt").get_attribute("open") is not None, message="excerpt did not open")
    assert "page 2" in page.find("#excerpt-meta").text and "recessed button" in page.find("#excerpt-text").text
    page.find("#excerpt-close").send_keys(Keys.ESCAPE)

    # Document text is shown as text: the <script> in it is visible, inert, and no element was made from it.
    hits = page.search("Kestrel thermostat firmware release notes")
    unsafe = [h for h in hits if h.get_attribute("data-document-name") == "release-notes.md"]
    assert unsafe and "<script>window.__xss = 1</script>" in unsafe[0].text and "<b>bold</b>" in unsafe[0].text
    unsafe[0].find_element("css selector", "button").click()
    assert "<img src=x id=injected>" in page.find("#excerpt-text").text
    assert page.js("return window.__xss === undefined && !document.getElementById('injected') && "
                   "!document.querySelector('#results b, #excerpt b, #results script, #excerpt script')")
    page.find("#excerpt-close").send_keys(Keys.ESCAPE)

    # 5. Delete a document; search no longer finds it.
    assert any(h.get_attribute("data-document-name") == "warranty-policy.txt"
               for h in page.search("How long is the warranty?"))
    page.find("#document-list li[data-document-name='warranty-policy.txt'] button.danger").click()
    assert "warranty-policy.txt" in page.accept_confirm()
    page.until(lambda: not page.all("#document-list li[data-document-name='warranty-policy.txt']"),
               message="document still listed")
    hits = page.search("How long is the warranty?")
    assert hits and all(h.get_attribute("data-document-name") != "warranty-policy.txt" for h in hits)
    page.shot("6-deleted")

    # 6. Stop the llm: the status turns red and a banner names it; an answer now fails, naming it too.
    # First, no banner while everything is up. A status poll that lands while the llm is busy on the 2-core CI
    # machine was seen once to show one for a moment (1 run of 5), so the precondition is waited for, and a banner
    # that stays is reported with its text.
    try:
        page.until(lambda: not page.find("#banner").is_displayed(), timeout=20)
    except TimeoutException:
        pytest.fail(f"a banner while every service is up: {page.find('#banner').text!r}")
    stack["llm"].stop()
    page.until(lambda: page.find("#banner").is_displayed() and "llm is down" in page.find("#banner").text,
               timeout=60, message="no banner for the stopped llm")
    assert page.find("#service-status li[data-service=llm]").get_attribute("data-state") == "down"
    page.find("input[name=mode][value=answer]").click()
    page.type_into("#question", QUESTION)
    page.find("#question").send_keys(Keys.ENTER)
    page.until(lambda: page.all(".turn.assistant:last-child .answer[data-state=error]"), timeout=120,
               message="the answer did not fail")
    assert "llm unavailable" in page.find(".turn.assistant:last-child .answer").text
    assert "llm unavailable" in page.find("#banner").text
    page.shot("7-llm-down")

    # No policy violations or script errors along the way (failed requests on purpose are logged, not errors).
    problems = [entry["message"] for entry in page.driver.get_log("browser")
                if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]]
    assert problems == []
