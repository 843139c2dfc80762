"""The HTML report in a real browser: it renders without console errors, the gallery filters work, and
a screenshot is saved for a human to look at.

Headless Chromium is driven over the Chrome DevTools Protocol through ``--remote-debugging-pipe``
(NUL-separated JSON on file descriptors 3 and 4), so no Python package beyond the standard library is
needed. The test skips when no Chromium is installed; CI installs it (``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from capvqa.report.build import build_report

ERROR_TYPES = ("error", "assert")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    explicit = os.environ.get("CAPVQA_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class PipeBrowser:
    """Headless Chromium with a minimal CDP client on the debugging pipe (one page, flat sessions)."""

    def __init__(self, executable: str, profile: Path, width: int = 1280, height: int = 1600) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser reads commands on fd 3 and writes replies on fd 4; bash moves the pipe ends there
        # (pass_fds keeps them open across exec; copies at free fds >= 10 cannot collide with 3 and 4)
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-extensions", "--no-first-run",
            "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={width},{height}",
            "--remote-debugging-pipe", "about:blank",
        ]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{high_r} 4>&{high_w}', executable, *args],
            pass_fds=(high_r, high_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in {to_browser_r, from_browser_w, high_r, high_w}:
            os.close(fd)
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(message))

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
             timeout: float = 20.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open_page(self) -> None:
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        target_id = page["targetId"] if page else self.call("Target.createTarget", {"url": "about:blank"},
                                                           session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target_id, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def navigate(self, url: str) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        self._drain()
        errors = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ERROR_TYPES:
                errors.append(json.dumps(params.get("args", []))[:500])
            elif event.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", "")[:500])
        return errors

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": metrics["width"], "height": min(metrics["height"], 6000), "scale": 1}
            params.update(captureBeyondViewport=True, clip=clip)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", params, timeout=60)["data"]))

    def _drain(self) -> None:
        while True:
            try:
                self.events.append(self._messages.get_nowait())
            except queue.Empty:
                return

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (RuntimeError, queue.Empty, OSError):
            self.process.terminate()  # it did not answer: end it the ordinary way
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the browser test needs it")
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to hand the DevTools pipe to Chromium")
    instance = PipeBrowser(executable, tmp_path_factory.mktemp("chromium-profile"))
    try:
        instance.open_page()
    except (RuntimeError, queue.Empty, OSError) as error:
        instance.close()
        pytest.fail(f"Chromium at {executable} did not answer on the DevTools pipe: {error}")
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:  # the synthetic run folders of the unit tests (tests/ is on sys.path in pytest's default mode)
        from test_report import make_run
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parent))
        from test_report import make_run

    root = tmp_path_factory.mktemp("browser-report")
    first = make_run(root / "captions10", num_captions=10, wrong_every=3, evil=True)
    second = make_run(root / "captions5", num_captions=5, wrong_every=4, evil=True)
    out = root / "report.html"
    build_report([first, second], html_path=out, markdown_path=root / "report.md")
    return out


COUNT_VISIBLE = ("Array.from(document.querySelectorAll('article.item'))"
                 ".filter(e => e.offsetParent !== null).length")


def test_report_renders_and_filters_in_chromium(
    browser: PipeBrowser, report_file: Path, tmp_path: Path
) -> None:
    browser.navigate(report_file.as_uri())
    assert browser.evaluate("document.title").startswith("capvqa report")
    total = browser.evaluate(COUNT_VISIBLE)
    expected_wrong = browser.evaluate("document.querySelectorAll('article.item[data-wrong=\"1\"]').length")
    assert total == 37 and 0 < expected_wrong < total
    assert browser.evaluate("document.getElementById('f-count').textContent") == f"{total} of {total} shown"
    # every thumbnail decoded (no broken data: URIs)
    assert browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert browser.evaluate("document.querySelectorAll('img.photo').length") == total
    browser.screenshot(tmp_path / "report-top.png")

    browser.evaluate("document.getElementById('f-wrong').click()")
    assert browser.evaluate(COUNT_VISIBLE) == expected_wrong
    browser.evaluate("document.getElementById('f-wrong').click()")
    assert browser.evaluate(COUNT_VISIBLE) == total

    disagree = browser.evaluate("document.querySelectorAll('article.item[data-disagree=\"1\"]').length")
    browser.evaluate("document.getElementById('f-disagree').click()")
    assert browser.evaluate(COUNT_VISIBLE) == disagree > 0
    browser.evaluate("document.getElementById('f-disagree').click()")

    browser.evaluate("(() => { const s = document.getElementById('f-atype'); s.value = 'yes/no';"
                     " s.dispatchEvent(new Event('change')); })()")
    yes_no = browser.evaluate("document.querySelectorAll('article.item[data-atype=\"yes/no\"]').length")
    assert browser.evaluate(COUNT_VISIBLE) == yes_no > 0
    browser.evaluate("(() => { const s = document.getElementById('f-atype'); s.value = '';"
                     " s.dispatchEvent(new Event('change')); })()")

    # the malicious question is shown as text, not run
    assert browser.evaluate("document.body.innerText.includes('<script>alert(1)</script>')")
    assert browser.evaluate("document.querySelectorAll('script').length") == 2

    browser.evaluate("document.getElementById('f-wrong').click()")
    browser.evaluate("document.getElementById('gallery').scrollIntoView()")
    browser.screenshot(tmp_path / "report-gallery-wrong.png")
    assert browser.console_errors() == []
    for name in ("report-top.png", "report-gallery-wrong.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    keep = os.environ.get("CAPVQA_REPORT_SCREENSHOTS")
    if keep:  # for a human to look at: CAPVQA_REPORT_SCREENSHOTS=/some/dir pytest ...
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in ("report-top.png", "report-gallery-wrong.png"):
            shutil.copy(tmp_path / name, Path(keep) / name)
        shutil.copy(report_file, Path(keep) / "report.html")
