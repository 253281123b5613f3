"""Open a report in headless Chromium over the DevTools protocol: console errors, DOM checks, screenshot.

Stdlib only: Chromium is started with ``--remote-debugging-pipe`` and spoken to over its file
descriptors 3 (commands in) and 4 (events and replies out), NUL-separated JSON, which is what
Playwright and Puppeteer do underneath. Used by the browser test and to make the README screenshot:

    python tests/support/browser.py REPORT.html -o shot.png [--width 1280] [--height 2000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable (``$STEPAUDIT_CHROMIUM`` first), or None."""
    explicit = os.environ.get("STEPAUDIT_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    """What a page did when loaded: errors of every kind, the value of the check expression, a screenshot."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    value: Any = None
    screenshot: bytes | None = None

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and dialogs (an ``alert`` means injected script ran)."""
        return self.console_errors + self.exceptions + [f"dialog: {d}" for d in self.dialogs]


class Chromium:
    """A headless Chromium process driven over the DevTools pipe; use as a context manager."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0) -> None:
        self.executable = executable or find_chromium()
        if not self.executable:
            raise FileNotFoundError(
                "no Chromium found: install it (Debian: apt-get install chromium) or set STEPAUDIT_CHROMIUM"
            )
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="stepaudit-chromium-")
        self._log = tempfile.TemporaryFile()
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def plumb() -> None:  # in the child: the protocol wants fds 3 and 4 exactly
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            preexec_fn=plumb,
            close_fds=False,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []

    # -- protocol -------------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()}): {self._stderr_tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its reply (events seen meanwhile are queued)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, method: str, timeout: float | None = None) -> dict:
        """Wait for an event (queued ones first)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(i)
            self._events.append(self._read(deadline))

    def _stderr_tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace")

    # -- pages --------------------------------------------------------------------------------------
    def open(
        self,
        url: str,
        expression: str | None = None,
        width: int = 1280,
        height: int = 900,
        screenshot: bool = True,
        full_page: bool = True,
        settle: float = 0.3,
        clip: tuple[float, float, float, float] | None = None,
    ) -> PageResult:
        """Load ``url`` in a fresh tab, evaluate ``expression`` and take a screenshot; collect every error.

        ``clip`` = (x, y, width, height) in CSS pixels of the page limits the screenshot to that area.
        """
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self._events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired")
        time.sleep(settle)  # let late console messages arrive
        result = PageResult()
        if expression is not None:
            evaluated = self.send(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True, "awaitPromise": True},
                session=session,
            )
            if "exceptionDetails" in evaluated:
                result.exceptions.append("check expression failed: " + _exception_text(evaluated["exceptionDetails"]))
            result.value = evaluated.get("result", {}).get("value")
        if screenshot:
            params: dict = {"format": "png"}
            if clip is not None:
                params.update(captureBeyondViewport=True, clip=dict(zip(("x", "y", "width", "height"), clip), scale=1))
            elif full_page:
                size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                params.update(
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
                )
            result.screenshot = base64.b64decode(self.send("Page.captureScreenshot", params, session=session)["data"])
        self._drain(session, result)
        self.send("Target.closeTarget", {"targetId": target})
        return result

    def _drain(self, session: str, result: PageResult) -> None:
        """Sort the page's events into errors, dialogs and requests."""
        for event in self._events:
            method, params = event.get("method"), event.get("params", {})
            if event.get("sessionId") not in (None, session):
                continue
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.console_errors.append(
                    " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                )
            elif method == "Runtime.exceptionThrown":
                result.exceptions.append(_exception_text(params.get("exceptionDetails", {})))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                result.console_errors.append(
                    f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
                )
            elif method == "Page.javascriptDialogOpening":
                result.dialogs.append(params.get("message", ""))
                self.send("Page.handleJavaScriptDialog", {"accept": True}, session=session)
            elif method == "Network.requestWillBeSent":
                result.requests.append(params.get("request", {}).get("url", ""))
        self._events.clear()

    def close(self) -> None:
        """Ask the browser to quit, then make sure it did."""
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _exception_text(details: dict) -> str:
    exception = details.get("exception", {})
    return str(exception.get("description") or details.get("text") or details)


def main(argv: list[str] | None = None) -> int:
    """Screenshot a local HTML file (and report its console errors)."""
    parser = argparse.ArgumentParser(prog="python tests/support/browser.py", description=main.__doc__)
    parser.add_argument("html", help="the HTML file to open")
    parser.add_argument("-o", "--output", default="screenshot.png", help="PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=0, help="crop to this height (0: the whole page)")
    parser.add_argument("--top", type=int, default=0, help="start the crop this many pixels down the page")
    args = parser.parse_args(argv)
    clip = (0, args.top, args.width, args.height) if args.height else None
    with Chromium() as browser:
        page = browser.open(Path(args.html).resolve().as_uri(), width=args.width, clip=clip)
    Path(args.output).write_bytes(page.screenshot or b"")
    for error in page.errors:
        print(f"error: {error}", file=sys.stderr)
    print(args.output)
    return 1 if page.errors else 0


if __name__ == "__main__":
    sys.exit(main())
