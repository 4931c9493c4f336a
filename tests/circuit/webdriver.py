"""A small W3C WebDriver client for headless Chromium (Debian's `chromium` and `chromium-driver`),
with the standard library only: the viewer tests and scripts/viewer_screenshots.py drive a real
browser through it.

    with Browser() as b:                 # starts chromedriver and a fresh headless Chromium
        b.open("http://127.0.0.1:8700/")
        b.wait_for("return window.__viewerReady")
        b.run("return document.title")
        b.screenshot("page.png")
        b.severe_logs()                   # console errors and failed loads

``available()`` says why not when either program is missing, so tests skip with that reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver", "chromium-driver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _which(names) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def available() -> str | None:
    """None when headless Chromium can run here; otherwise the reason it cannot."""
    if _which(CHROMIUM) is None:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if _which(DRIVER) is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One chromedriver process and one headless Chromium session (close() ends both)."""

    def __init__(self, width: int = 1600, height: int = 1200, timeout: float = 60.0):
        why = available()
        if why:
            raise RuntimeError(why)
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="icl-chromium-")
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.driver = subprocess.Popen([_which(DRIVER), f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        try:
            self._wait_driver()
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": _which(CHROMIUM),
                                       "args": FLAGS + [f"--user-data-dir={self.profile}",
                                                        f"--window-size={width},{height}"]},
                "goog:loggingPrefs": {"browser": "ALL"},
            }}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self._stop_driver()
            raise

    # ---- protocol ----------------------------------------------------------------------------
    def _wait_driver(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/status", timeout=2) as r:
                    if json.load(r)["value"].get("ready"):
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError("chromedriver did not start within 20 s")

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:600]
            raise RuntimeError(f"webdriver {method} {path}: {exc.code} {detail}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    # ---- what the tests use ------------------------------------------------------------------
    def open(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args):
        """Run ``script`` (a function body; ``arguments`` holds args) in the page; its return value."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 20.0, abort_if: str | None = None):
        """Poll ``script`` until it returns something truthy; that value. When ``abort_if`` (a
        script) returns something truthy first, fail at once with it (say, the page's errors)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.run(script)
            if value:
                return value
            problem = self.run(abort_if) if abort_if else None
            if problem:
                raise AssertionError(f"page failed while waiting for `{script}`: {problem}")
            time.sleep(0.1)
        raise TimeoutError(f"page did not satisfy `{script}` within {timeout:.0f} s")

    def click(self, css: str) -> None:
        """A real pointer click on the first element matching ``css`` (found again if the page
        redrew it in between)."""
        for attempt in range(3):
            el = self._call("POST", self._s("/element"), {"using": "css selector", "value": css})
            try:
                self._call("POST", self._s(f"/element/{next(iter(el.values()))}/click"))
                return
            except RuntimeError as exc:
                if "stale element" not in str(exc) or attempt == 2:
                    raise

    def screenshot(self, path: Path | str) -> Path:
        png = base64.b64decode(self._call("GET", self._s("/screenshot")))
        Path(path).write_bytes(png)
        return Path(path)

    def full_page_height(self) -> int:
        return int(self.run("return document.documentElement.scrollHeight"))

    def resize(self, width: int, height: int) -> None:
        self._call("POST", self._s("/window/rect"), {"width": width, "height": height})

    def severe_logs(self) -> list[str]:
        """Browser console entries at level SEVERE since the last call (errors, failed loads)."""
        entries = self._call("POST", self._s("/se/log"), {"type": "browser"})
        return [e["message"] for e in entries if e.get("level") == "SEVERE"]

    def close(self) -> None:
        try:
            self._call("DELETE", self._s(""))
        except (OSError, RuntimeError):
            pass
        finally:
            self._stop_driver()

    def _stop_driver(self) -> None:
        self.driver.terminate()
        try:
            self.driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # a quick self-check: python tests/circuit/webdriver.py
    print(available() or "chromium and chromedriver found")
    if not available():
        with Browser() as b:
            b.open("data:text/html,<title>ok</title>")
            print(b.run("return document.title"), os.getpid())
