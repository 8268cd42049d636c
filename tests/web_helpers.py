"""Helpers for the browser tests: launching Debian's Chromium, serving the page without a server, and a
scripted WebSocket peer for cases a correct server never produces (gaps, epoch resets)."""

from __future__ import annotations

import json
import mimetypes
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route, WebSocketRoute

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WEB_DIR = Path(__file__).resolve().parent.parent / "src" / "parley" / "web"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FAKE_ORIGIN = "http://parley.test"


def chromium_missing_reason() -> str | None:
    """Return why the browser tests cannot run here, or None when they can."""
    if shutil.which(CHROMIUM_PATH) is None:
        return f"{CHROMIUM_PATH} not found: apt-get install -y chromium fonts-noto-cjk"
    return None


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS)


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def collect_page_errors(page: Page) -> list[str]:
    """Record uncaught exceptions and console errors of `page` into the returned list as they happen."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


# ---- the page against a real server ----


def new_chat_page(
    browser: Browser, base_url: str, *, locale: str = "en-US", width: int = 1000, bypass_csp: bool = False
) -> Page:
    context = browser.new_context(
        locale=locale, viewport={"width": width, "height": 720}, bypass_csp=bypass_csp
    )
    page = context.new_page()
    page.goto(base_url + "/")
    page.wait_for_selector("html[data-ready='true']")
    return page


def sign_in(page: Page, user: str) -> None:
    page.get_by_label("User name").fill(user)
    page.get_by_role("button", name="Sign in").click()
    wait_connected(page)


def wait_connected(page: Page, timeout: float = 60_000) -> None:
    page.wait_for_selector("#connection[data-state='connected']", timeout=timeout)


def join_room(page: Page, room: str) -> None:
    page.locator("#join-input").fill(room)
    page.locator("#join-form button[type='submit']").click()
    page.wait_for_function(
        "room => window.parleyDebug.snapshot().rooms[room]?.joined === true", arg=room, timeout=30_000
    )


def send_message(page: Page, text: str) -> None:
    composer = page.locator("#composer-input")
    composer.fill(text)
    composer.press("Enter")


def message_bodies(page: Page) -> list[str]:
    """Return the bodies of the open room's stored messages (not pending ones), top to bottom."""
    return page.locator("#message-lists .message[data-seq] .body").all_text_contents()


def wait_for_bodies(page: Page, expected: list[str], timeout: float = 60_000) -> None:
    """Wait until the open room shows `expected` as its last stored message bodies."""
    page.wait_for_function(
        """expected => {
            const bodies = [...document.querySelectorAll('#message-lists .message[data-seq] .body')]
                .map(node => node.textContent);
            return JSON.stringify(bodies.slice(-expected.length)) === JSON.stringify(expected);
        }""",
        arg=expected,
        timeout=timeout,
    )


def http_history(base_url: str, room: str, limit: int = 200) -> list[dict[str, Any]]:
    with urllib.request.urlopen(
        f"{base_url}/api/rooms/{room}/messages?after=0&limit={limit}", timeout=10
    ) as reply:
        data = json.load(reply)
    messages = data["messages"] if isinstance(data, dict) else data
    assert isinstance(messages, list)
    return messages


# ---- the page without a server ----


def serve_static(context: BrowserContext) -> None:
    """Serve src/parley/web under FAKE_ORIGIN, so that the page runs against a scripted WebSocket peer."""

    def handle(route: Route) -> None:
        path = route.request.url.removeprefix(FAKE_ORIGIN).split("?", 1)[0].lstrip("/") or "index.html"
        file = (WEB_DIR / path).resolve()
        if WEB_DIR not in file.parents or not file.is_file():
            route.fulfill(status=404, body="not found")
            return
        content_type = "text/javascript" if file.suffix == ".js" else mimetypes.guess_type(file.name)[0]
        route.fulfill(
            status=200, body=file.read_bytes(), content_type=content_type or "application/octet-stream"
        )

    context.route(f"{FAKE_ORIGIN}/**", handle)


class ScriptedPeer:
    """A WebSocket server played by the test, which records the page's frames and sends the test's frames.

    `on_hello` builds the frames sent back to each `hello`. Every connection is kept in `connections`.
    """

    def __init__(
        self, context: BrowserContext, on_hello: Callable[[dict[str, Any]], list[dict[str, Any]]]
    ) -> None:
        self.on_hello = on_hello
        self.connections: list[WebSocketRoute] = []
        self.received: list[dict[str, Any]] = []
        context.route_web_socket(f"{FAKE_ORIGIN.replace('http', 'ws')}/ws", self._accept)

    def _accept(self, socket: WebSocketRoute) -> None:
        self.connections.append(socket)
        socket.on_message(lambda text: self._receive(socket, text))

    def _receive(self, socket: WebSocketRoute, text: str | bytes) -> None:
        parsed = json.loads(text)
        frames = parsed if isinstance(parsed, list) else [parsed]
        for frame in frames:
            self.received.append(frame)
            if frame.get("type") == "hello":
                for reply in self.on_hello(frame):
                    socket.send(json.dumps(reply))

    def send(self, *frames: dict[str, Any]) -> None:
        """Send `frames` as one array message on the latest connection."""
        self.connections[-1].send(json.dumps(list(frames)))

    def frames_of(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.received if frame.get("type") == kind]
