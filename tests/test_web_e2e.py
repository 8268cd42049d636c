"""End-to-end tests of the browser client in headless Chromium, against `parley serve` or a scripted peer."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from conftest import ServerProcess, services_required

pytest.importorskip("playwright", reason="pip install playwright")

from web_helpers import (
    FAKE_ORIGIN,
    ScriptedPeer,
    chromium_missing_reason,
    collect_page_errors,
    http_history,
    join_room,
    launch_chromium,
    message_bodies,
    new_chat_page,
    screenshot,
    send_message,
    serve_static,
    sign_in,
    wait_connected,
    wait_for_bodies,
)

pytestmark = pytest.mark.browser

WEB_TEST_SECRET = "web-test-secret-of-at-least-32-bytes"

if reason := chromium_missing_reason():
    if services_required():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Open pages in fresh browser contexts (separate localStorage each); all are closed at the end."""
    opened: list[Page] = []

    def open_page(base_url: str, **options: Any) -> Page:
        page = new_chat_page(browser, base_url, **options)
        opened.append(page)
        return page

    yield open_page
    for page in opened:
        page.context.close()


def post_messages(server: ServerProcess, user: str, room: str, bodies: list[str]) -> None:
    """Store `bodies` in `room` as `user` through a plain WebSocket, waiting for every `sent`."""
    with ws_connect(server.url, open_timeout=10) as socket:
        socket.send(json.dumps({"type": "hello", "user": user}))
        socket.send(json.dumps({"type": "join", "room": room}))
        for index, body in enumerate(bodies):
            socket.send(json.dumps({"type": "send", "room": room, "id": f"py-{index}", "body": body}))
        confirmed = 0
        deadline = time.monotonic() + 30
        while confirmed < len(bodies) and time.monotonic() < deadline:
            frame = json.loads(socket.recv(timeout=10))
            frames = frame if isinstance(frame, list) else [frame]
            confirmed += sum(1 for item in frames if item.get("type") == "sent")
        assert confirmed == len(bodies)


# ---- against parley serve ----


def test_two_pages_chat(server: ServerProcess, pages: Callable[..., Page]) -> None:
    alice = pages(server.http_url)
    bob = pages(server.http_url)
    errors = collect_page_errors(alice) + collect_page_errors(bob)
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    join_room(alice, "lobby")
    join_room(bob, "lobby")

    send_message(alice, "hello bob")
    wait_for_bodies(bob, ["hello bob"])
    send_message(bob, "hi alice\nsecond line")
    wait_for_bodies(alice, ["hello bob", "hi alice\nsecond line"])

    own = alice.locator(".message.own[data-seq]").first
    assert own.locator(".sender").text_content() == "alice"
    # Bob has the room open with the message on screen, so his read marker reaches alice as a receipt.
    alice.wait_for_selector(".message.own[data-seq] .status[data-status='read']", timeout=30_000)
    alice.locator("#online summary").click()
    alice.wait_for_selector("#online-list li:has-text('bob')")
    time_text = bob.locator(".message[data-seq] time").first.text_content()
    assert time_text
    assert bob.locator(".message[data-seq] .day").first.is_visible()
    screenshot(alice, "web-en-desktop-chat")
    assert errors == []


def test_offline_page_catches_up_in_order(server: ServerProcess, pages: Callable[..., Page]) -> None:
    alice = pages(server.http_url)
    bob = pages(server.http_url)
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    join_room(alice, "lobby")
    join_room(bob, "lobby")
    send_message(alice, "before")
    wait_for_bodies(bob, ["before"])

    bob.context.set_offline(True)
    bob.wait_for_selector("#connection[data-state='offline']")
    sent_while_offline = [f"offline {index}" for index in range(12)]
    for body in sent_while_offline:
        send_message(alice, body)
    wait_for_bodies(alice, sent_while_offline)
    assert bob.locator("#message-lists .message[data-seq]").count() == 1

    bob.context.set_offline(False)
    wait_connected(bob)
    wait_for_bodies(bob, sent_while_offline)
    assert message_bodies(bob) == ["before", *sent_while_offline]
    counters = bob.evaluate("window.parleyDebug.snapshot().counters")
    assert counters["welcomes"] >= 2


def test_server_restart_resumes_without_duplicates(server: ServerProcess, pages: Callable[..., Page]) -> None:
    alice = pages(server.http_url)
    sign_in(alice, "alice")
    join_room(alice, "lobby")
    send_message(alice, "one")
    wait_for_bodies(alice, ["one"])

    server.restart(signal.SIGTERM)
    post_messages(server, "carol", "lobby", ["two", "three"])
    alice.wait_for_function("() => window.parleyDebug.snapshot().counters.welcomes === 2", timeout=60_000)
    wait_for_bodies(alice, ["one", "two", "three"])
    assert message_bodies(alice) == ["one", "two", "three"]


def test_outbox_survives_reload_with_server_down(server: ServerProcess, pages: Callable[..., Page]) -> None:
    alice = pages(server.http_url)
    sign_in(alice, "alice")
    join_room(alice, "lobby")
    send_message(alice, "stored first")
    wait_for_bodies(alice, ["stored first"])

    server.stop(signal.SIGKILL)
    alice.wait_for_selector("#connection[data-state='waiting']")
    send_message(alice, "written while the server was down")
    alice.wait_for_selector(".message.pending .status[data-status='sending']")
    outbox = alice.evaluate("window.parleyDebug.snapshot().outbox")
    assert len(outbox) == 1

    alice.goto("about:blank")
    server.start()
    alice.goto(server.http_url + "/")
    wait_connected(alice)
    wait_for_bodies(alice, ["stored first", "written while the server was down"])
    alice.wait_for_function("() => window.parleyDebug.snapshot().outbox.length === 0")

    bodies = [message["body"] for message in http_history(server.http_url, "lobby")]
    assert bodies == ["stored first", "written while the server was down"]
    assert alice.locator(".message.pending").count() == 0


def test_lost_sent_reply_is_stored_once(server: ServerProcess, pages: Callable[..., Page]) -> None:
    alice = pages(server.http_url)
    sign_in(alice, "alice")
    join_room(alice, "lobby")
    dropping = {"on": True}

    def relay(socket: Any) -> None:
        upstream = socket.connect_to_server()

        def downstream(text: str | bytes) -> None:
            parsed = json.loads(text)
            frames = parsed if isinstance(parsed, list) else [parsed]
            if dropping["on"]:
                frames = [frame for frame in frames if frame.get("type") not in ("sent", "msg")]
            if frames:
                socket.send(json.dumps(frames))

        upstream.on_message(downstream)

    # After the reload the page connects through the relay, which swallows every `sent` and `msg`.
    alice.route_web_socket("**/ws", relay)
    alice.reload()
    wait_connected(alice)
    send_message(alice, "confirmation lost")
    alice.wait_for_selector(".message.pending .status[data-status='sending']")
    deadline = time.monotonic() + 30
    while not http_history(server.http_url, "lobby") and time.monotonic() < deadline:
        alice.wait_for_timeout(100)
    assert [message["body"] for message in http_history(server.http_url, "lobby")] == ["confirmation lost"]

    dropping["on"] = False
    alice.reload()
    wait_connected(alice)
    wait_for_bodies(alice, ["confirmation lost"])
    alice.wait_for_function("() => window.parleyDebug.snapshot().outbox.length === 0")
    assert [message["body"] for message in http_history(server.http_url, "lobby")] == ["confirmation lost"]
    assert message_bodies(alice) == ["confirmation lost"]


def test_markup_shows_as_text(server: ServerProcess, pages: Callable[..., Page]) -> None:
    # Without the Content-Security-Policy, an injected handler would run: the DOM building alone must stop it.
    alice = pages(server.http_url, bypass_csp=True)
    bob = pages(server.http_url, bypass_csp=True)
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    join_room(alice, "lobby")
    join_room(bob, "lobby")
    hostile = [
        "<script>window.__pwned = 'script'</script>",
        "<img src=x onerror=\"window.__pwned = 'img'\">",
        "see https://example.com/a?b=1&c=<b>2</b>, javascript:window.__pwned='js' and <a href=x>x</a>",
    ]
    for body in hostile:
        send_message(alice, body)
    wait_for_bodies(bob, hostile)

    assert message_bodies(bob) == hostile
    bodies = bob.locator("#message-lists .body")
    assert bob.locator("#message-lists .body img, #message-lists .body script").count() == 0
    assert bob.evaluate("window.__pwned") is None
    assert alice.evaluate("window.__pwned") is None
    links = bodies.locator("a")
    assert links.count() == 1
    assert links.first.get_attribute("href") == "https://example.com/a?b=1&c="
    assert links.first.get_attribute("rel") == "noopener noreferrer"
    assert links.first.get_attribute("target") == "_blank"


def test_scroll_back_loads_all_history(server: ServerProcess, pages: Callable[..., Page]) -> None:
    bodies = [f"history {index:03d}" for index in range(1, 131)]
    post_messages(server, "carol", "archive", bodies)
    bob = pages(server.http_url)
    sign_in(bob, "bob")
    join_room(bob, "archive")
    wait_for_bodies(bob, bodies[-3:])

    for _ in range(20):
        if bob.locator("#history-state").text_content() == "This is the beginning of the room.":
            break
        bob.locator("#scroller").evaluate(
            "node => { node.scrollTop = 0; node.dispatchEvent(new Event('scroll')); }"
        )
        bob.wait_for_timeout(200)
    assert message_bodies(bob) == bodies


def test_chinese_interface_at_360_px(server: ServerProcess, pages: Callable[..., Page]) -> None:
    page = pages(server.http_url, locale="zh-CN", width=360)
    other = pages(server.http_url)
    assert page.locator("#sign-in-form button[type='submit']").text_content() == "登录"
    page.locator("#sign-in-user").fill("li")
    page.locator("#sign-in-form button[type='submit']").click()
    wait_connected(page)
    sign_in(other, "wang")
    join_room(page, "teahouse")
    join_room(other, "teahouse")
    send_message(other, "你好！今天下午三点开会，地址见 https://example.com/会议")
    send_message(page, "收到，谢谢。" * 6)
    wait_for_bodies(page, ["你好！今天下午三点开会，地址见 https://example.com/会议", "收到，谢谢。" * 6])

    assert page.locator("#send").text_content() == "发送"
    assert page.locator("#connection-text").text_content() == "已连接"
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    screenshot(page, "web-zh-360-room")

    page.locator("#back-to-rooms").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    screenshot(page, "web-zh-360-rooms")

    page.locator("#language").select_option("en")
    assert page.locator("#send").text_content() == "Send"
    page.reload()
    wait_connected(page)
    assert page.locator("#send").text_content() == "Send"


def test_sign_out_returns_to_sign_in(server: ServerProcess, pages: Callable[..., Page]) -> None:
    page = pages(server.http_url, width=360)
    sign_in(page, "alice")
    page.get_by_role("button", name="Sign out").click()
    assert page.locator("#sign-in").is_visible()
    page.reload()
    assert page.locator("#sign-in").is_visible()
    page.get_by_label("User name").fill("not a valid name!")
    page.get_by_role("button", name="Sign in").click()
    assert (
        page.locator("#sign-in-error").text_content()
        == "A user name is 1 to 64 characters: letters, digits, . _ : -"
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    screenshot(page, "web-en-360-sign-in")


def test_unread_counts_and_leaving(server: ServerProcess, pages: Callable[..., Page]) -> None:
    alice = pages(server.http_url)
    bob = pages(server.http_url)
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    join_room(bob, "side")
    join_room(bob, "lobby")
    join_room(alice, "side")
    for index in range(3):
        send_message(alice, f"psst {index}")
    wait_for_bodies(alice, ["psst 0", "psst 1", "psst 2"])

    side = bob.locator("#room-list button[data-room='side']")
    side.locator(".badge").filter(has_text="3").wait_for()
    side.click()
    wait_for_bodies(bob, ["psst 0", "psst 1", "psst 2"])
    side.locator(".badge").wait_for(state="hidden")

    bob.get_by_role("button", name="Leave room").click()
    side.wait_for(state="detached")
    bob.reload()
    wait_connected(bob)
    bob.locator("#room-list button[data-room='lobby']").wait_for()
    assert bob.locator("#room-list .room-name").all_text_contents() == ["lobby"]


def test_token_sign_in(server_factory: Callable[..., ServerProcess], pages: Callable[..., Page]) -> None:
    from parley.server.auth import mint_token

    server = server_factory("--secret", WEB_TEST_SECRET)
    page = pages(server.http_url)
    page.get_by_label("User name").fill("alice")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#sign-in-error[data-key='tokenRequired']")
    assert page.locator("#token-details").get_attribute("open") is not None

    page.get_by_label("Access token").fill(mint_token("dora", WEB_TEST_SECRET))
    page.get_by_role("button", name="Sign in").click()
    wait_connected(page)
    assert page.locator("#me").text_content() == "dora"
    join_room(page, "lobby")
    send_message(page, "signed with a token")
    wait_for_bodies(page, ["signed with a token"])

    page.reload()
    wait_connected(page)
    wait_for_bodies(page, ["signed with a token"])
    assert page.locator("#me").text_content() == "dora"


# ---- against a scripted peer: cases a correct server never produces ----


def welcome(user: str) -> dict[str, Any]:
    return {
        "type": "welcome",
        "protocol": 1,
        "user": user,
        "session": "s",
        "heartbeat": 25000,
        "ack_timeout": 5000,
        "max_body": 16384,
        "max_meta": 2048,
        "max_frame": 110592,
    }


def message(seq: int, body: str, sender: str = "bob", room: str = "lobby") -> dict[str, Any]:
    return {
        "type": "msg",
        "room": room,
        "seq": seq,
        "id": f"b-{seq}",
        "from": sender,
        "ts": 1765000000000 + seq,
        "body": body,
    }


def open_scripted(browser: Browser, **welcome_fields: Any) -> tuple[Page, ScriptedPeer]:
    """Open a page signed in as alice against a scripted peer that resumes room `lobby` at seq 0."""
    context = browser.new_context(locale="en-US")
    serve_static(context)
    peer = ScriptedPeer(
        context,
        lambda hello: [
            welcome(hello.get("user", "alice")) | welcome_fields,
            {"type": "joined", "room": "lobby", "epoch": "e1", "head": 0, "since": 0},
        ],
    )
    page = context.new_page()
    page.goto(FAKE_ORIGIN + "/")
    page.locator("#sign-in-user").fill("alice")
    page.locator("#sign-in-form button[type='submit']").click()
    wait_connected(page)
    page.locator("#room-list button[data-room='lobby']").click()
    return page, peer


@pytest.fixture
def scripted(browser: Browser) -> Iterator[tuple[Page, ScriptedPeer]]:
    page, peer = open_scripted(browser)
    yield page, peer
    page.context.close()


def test_hello_asks_for_batches_and_resume(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    hello = peer.frames_of("hello")[0]
    assert hello["batch"] is True
    assert hello["user"] == "alice"
    peer.send(message(1, "one"), message(2, "two"))
    wait_for_bodies(page, ["one", "two"])
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.acks >= 1")

    page.reload()
    wait_connected(page)
    assert peer.frames_of("hello")[-1]["resume"] == {"lobby": {"since": 2, "epoch": "e1"}}


def test_batch_is_acked_once_after_rendering(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    peer.send(*[message(seq, f"m{seq}") for seq in range(1, 21)])
    wait_for_bodies(page, [f"m{seq}" for seq in range(1, 21)])
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.acks >= 1")
    page.wait_for_timeout(300)
    acks = peer.frames_of("ack")
    assert acks == [{"type": "ack", "room": "lobby", "seq": 20}]


def test_duplicates_are_dropped(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    peer.send(message(1, "one"), message(2, "two"), message(1, "one"))
    peer.send(message(2, "two"), message(3, "three"))
    wait_for_bodies(page, ["one", "two", "three"])
    assert message_bodies(page) == ["one", "two", "three"]
    assert page.evaluate("window.parleyDebug.snapshot().counters.duplicates") == 2


def test_gap_triggers_join_from_position(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    peer.send(message(1, "one"))
    wait_for_bodies(page, ["one"])
    peer.send(message(3, "three"), message(4, "four"))
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.gaps === 2")
    joins = [frame for frame in peer.frames_of("join") if frame.get("since") == 1]
    assert joins == [{"type": "join", "room": "lobby", "since": 1, "epoch": "e1"}]
    assert message_bodies(page) == ["one"]

    peer.send(
        {"type": "joined", "room": "lobby", "epoch": "e1", "head": 4, "since": 1},
        message(2, "two"),
        message(3, "three"),
        message(4, "four"),
    )
    wait_for_bodies(page, ["one", "two", "three", "four"])
    assert message_bodies(page) == ["one", "two", "three", "four"]


def test_reset_drops_the_old_epoch(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    peer.send(message(1, "old one"), message(2, "old two"))
    wait_for_bodies(page, ["old one", "old two"])
    peer.send(
        {"type": "joined", "room": "lobby", "epoch": "e2", "head": 1, "since": 0, "reset": True},
        message(1, "new one"),
    )
    wait_for_bodies(page, ["new one"])
    assert message_bodies(page) == ["new one"]
    page.wait_for_function("() => window.parleyDebug.snapshot().rooms.lobby.epoch === 'e2'")


def test_unauthorized_close_returns_to_sign_in(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    connections = len(peer.connections)
    peer.connections[-1].close(code=4001, reason="token expired")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert page.locator("#sign-in-error").text_content() != ""
    snapshot = page.evaluate("window.parleyDebug.snapshot()")
    assert snapshot["state"] == "signed-out"
    assert snapshot["retryAt"] is None
    assert len(peer.connections) == connections


def test_resend_after_reconnect_keeps_id(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    send_message(page, "are you there?")
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.sends === 1")
    first = peer.frames_of("send")[0]
    peer.connections[-1].close(code=1001, reason="going away")
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.welcomes === 2")
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.sends >= 2")
    again = peer.frames_of("send")[-1]
    assert again == first
    peer.send(
        {"type": "sent", "room": "lobby", "id": first["id"], "seq": 1, "ts": 1765000000000},
        message(1, "are you there?", sender="alice") | {"id": first["id"]},
    )
    wait_for_bodies(page, ["are you there?"])
    assert page.locator(".message.pending").count() == 0
    assert page.evaluate("window.parleyDebug.snapshot().outbox") == []


def test_enter_sends_and_shift_enter_adds_line(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    composer = page.locator("#composer-input")
    composer.focus()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert peer.frames_of("send") == []
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.parleyDebug.snapshot().counters.sends === 1")
    assert peer.frames_of("send")[0]["body"] == "first line\nsecond line"
    assert composer.input_value() == ""


def test_both_languages_have_every_string(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, _ = scripted
    tables = page.evaluate("async () => (await import('./i18n.js')).STRING_TABLES")
    assert set(tables) == {"en", "zh-CN"}
    assert sorted(tables["zh-CN"]) == sorted(tables["en"])
    empty = [(language, key) for language, table in tables.items() for key, text in table.items() if not text]
    assert empty == []
    used = page.evaluate(
        """() => [...document.querySelectorAll('[data-i18n], [data-i18n-placeholder]')]
            .map(node => node.dataset.i18n ?? node.dataset.i18nPlaceholder)"""
    )
    assert [key for key in used if key not in tables["en"]] == []


def test_controls_labelled_and_keyboard_usable(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, peer = scripted
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(node => !node.closest('[hidden]'))
            .filter(node => !node.labels?.length && !node.getAttribute('aria-label'))
            .filter(node => !node.textContent.trim())
            .map(node => node.id || node.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []

    page.locator("#join-input").focus()
    page.keyboard.type("kitchen")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#room-title').textContent === 'kitchen'")
    joins = [frame for frame in peer.frames_of("join") if frame["room"] == "kitchen"]
    assert joins == [{"type": "join", "room": "kitchen"}]

    lobby = page.locator("#room-list button[data-room='lobby']")
    lobby.focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#room-title').textContent === 'lobby'")
    assert lobby.get_attribute("aria-current") == "true"


def test_resend_after_ack_timeout(browser: Browser) -> None:
    page, peer = open_scripted(browser, ack_timeout=200)
    try:
        send_message(page, "anyone?")
        page.wait_for_function("() => window.parleyDebug.snapshot().counters.resends >= 2")
        sends = peer.frames_of("send")
        assert len(sends) >= 3
        assert all(frame == sends[0] for frame in sends)
        assert len(peer.connections) == 1
    finally:
        page.context.close()


def test_backoff_has_full_jitter_and_a_cap(scripted: tuple[Page, ScriptedPeer]) -> None:
    page, _ = scripted
    delays = page.evaluate(
        """async () => {
            const { backoffDelay } = await import('./session.js');
            const attempts = [...Array(12).keys()];
            return {
                lowest: attempts.map(attempt => backoffDelay(attempt, () => 0)),
                highest: attempts.map(attempt => backoffDelay(attempt, () => 0.999999)),
            };
        }"""
    )
    assert delays["lowest"] == [0] * 12
    assert delays["highest"][:7] == [499, 999, 1999, 3999, 7999, 15999, 29999]
    assert delays["highest"][7:] == [29999] * 5
