"""The client outbox: resend deadlines, backoff, ordering and final errors, driven by a fake clock."""

from __future__ import annotations

import ast
import importlib
import random
import re
from pathlib import Path

import pytest

from parley.protocol.outbox import Outbox, PendingSend


def ids(entries: list[PendingSend]) -> list[str]:
    return [entry.id for entry in entries]


def connected_outbox(send_timeout: float = 10.0, backoff_cap: float = 60.0) -> Outbox:
    outbox = Outbox(send_timeout=send_timeout, backoff_cap=backoff_cap, id_prefix="p")
    assert outbox.on_reconnect(0.0) == []
    return outbox


def test_new_id_format_and_uniqueness() -> None:
    outbox = Outbox()
    other = Outbox()

    first = [outbox.new_id() for _ in range(1000)]
    second = [other.new_id() for _ in range(1000)]

    pattern = re.compile(r"c-[0-9a-f]{16}-\d+")
    assert all(pattern.fullmatch(message_id) for message_id in first)
    assert all(len(message_id) <= 64 for message_id in first)
    assert len(set(first)) == 1000
    assert not set(first) & set(second)


def test_add_while_connected_transmits_at_once() -> None:
    outbox = connected_outbox()

    entry = outbox.add("lobby", "a", "hello", {"reply_to": 4}, now=1.0)

    assert entry is not None
    assert entry.to_frame() == {
        "type": "send",
        "room": "lobby",
        "id": "a",
        "body": "hello",
        "meta": {"reply_to": 4},
    }
    assert entry.deadline == 11.0
    assert outbox.next_deadline() == 11.0


def test_frame_omits_missing_meta() -> None:
    outbox = connected_outbox()

    entry = outbox.add("lobby", "a", "", None, now=0.0)

    assert entry is not None
    assert entry.to_frame() == {"type": "send", "room": "lobby", "id": "a", "body": ""}


def test_add_while_disconnected_waits() -> None:
    outbox = Outbox(id_prefix="p")

    assert outbox.add("lobby", "a", "hi", None, now=0.0) is None
    assert outbox.due(100.0) == []
    assert outbox.next_deadline() is None
    assert ids(outbox.pending()) == ["a"]


def test_duplicate_pending_id_rejected() -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "hi", None, now=0.0)

    with pytest.raises(ValueError, match="already pending"):
        outbox.add("lobby", "a", "other", None, now=0.0)

    assert outbox.add("kitchen", "a", "same id, other room", None, now=0.0) is not None


def test_resend_after_timeout() -> None:
    outbox = connected_outbox(send_timeout=10.0)
    outbox.add("lobby", "a", "hi", None, now=0.0)

    assert outbox.due(9.999) == []
    resent = outbox.due(10.0)

    assert ids(resent) == ["a"]
    assert resent[0].to_frame()["id"] == "a"
    assert outbox.statistics().resends == 1


def test_resend_backoff_doubles_until_cap() -> None:
    outbox = connected_outbox(send_timeout=1.0, backoff_cap=5.0)
    outbox.add("lobby", "a", "hi", None, now=0.0)
    resend_times: list[float] = []

    now = 0.0
    for _ in range(7):
        deadline = outbox.next_deadline()
        assert deadline is not None
        now = deadline
        assert ids(outbox.due(now)) == ["a"]
        resend_times.append(now)

    # Waits of 1, 2, 4, then capped at 5.
    assert resend_times == [1.0, 3.0, 7.0, 12.0, 17.0, 22.0, 27.0]
    assert outbox.statistics().resends == 7


def test_sent_removes_entry_and_stops_resends() -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "hi", None, now=0.0)

    confirmed = outbox.on_sent("lobby", "a", seq=7, dup=False)

    assert confirmed is not None
    assert confirmed.id == "a"
    assert outbox.pending() == []
    assert outbox.due(1000.0) == []
    assert outbox.next_deadline() is None


def test_sent_for_unknown_id_ignored() -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "hi", None, now=0.0)
    outbox.on_sent("lobby", "a", seq=7, dup=False)

    assert outbox.on_sent("lobby", "a", seq=7, dup=True) is None
    assert outbox.on_sent("kitchen", "a", seq=1, dup=False) is None
    statistics = outbox.statistics()
    assert statistics.confirmed == 1
    assert statistics.confirmed_as_duplicate == 0


def test_dup_confirmation_counted() -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "hi", None, now=0.0)

    outbox.on_sent("lobby", "a", seq=3, dup=True)

    assert outbox.statistics().confirmed_as_duplicate == 1


@pytest.mark.parametrize(
    "code", ["id_conflict", "invalid_field", "too_large", "not_joined", "forbidden", "unknown_code"]
)
def test_final_error_removes_entry(code: str) -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "hi", None, now=0.0)

    failed = outbox.on_error("lobby", "a", code, now=1.0)

    assert failed is not None
    assert failed.id == "a"
    assert outbox.pending() == []
    assert outbox.due(1000.0) == []
    assert outbox.statistics().failed == 1


def test_error_for_unknown_id_ignored() -> None:
    outbox = connected_outbox()

    assert outbox.on_error("lobby", "nope", "id_conflict", now=0.0) is None
    assert outbox.statistics().failed == 0


def test_rate_limited_retries_after_retry_after() -> None:
    outbox = connected_outbox(send_timeout=10.0)
    outbox.add("lobby", "a", "hi", None, now=0.0)

    assert outbox.on_error("lobby", "a", "rate_limited", now=1.0, retry_after=2.5) is None

    assert ids(outbox.pending()) == ["a"]
    assert outbox.next_deadline() == 3.5
    assert outbox.due(3.4) == []
    assert ids(outbox.due(3.5)) == ["a"]


def test_overloaded_without_retry_after_uses_backoff() -> None:
    outbox = connected_outbox(send_timeout=2.0)
    outbox.add("lobby", "a", "hi", None, now=0.0)

    assert outbox.on_error("lobby", "a", "overloaded", now=1.0) is None

    assert outbox.next_deadline() == 3.0
    assert ids(outbox.due(3.0)) == ["a"]


def test_rate_limited_room_keeps_add_order() -> None:
    outbox = connected_outbox(send_timeout=10.0)
    outbox.add("lobby", "a", "1", None, now=0.0)
    outbox.add("lobby", "b", "2", None, now=0.0)
    outbox.on_sent("lobby", "b", seq=1, dup=False)
    outbox.on_error("lobby", "a", "rate_limited", now=0.5, retry_after=1.0)

    held_back = outbox.add("lobby", "c", "3", None, now=0.6)
    other_room = outbox.add("kitchen", "d", "4", None, now=0.6)
    retried = outbox.due(1.5)
    after_pause = outbox.add("lobby", "e", "5", None, now=1.6)

    assert held_back is None
    assert other_room is not None
    assert ids(retried) == ["a", "c"]
    assert after_pause is not None


def test_add_after_pause_expiry_waits_for_due() -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "1", None, now=0.0)
    outbox.on_error("lobby", "a", "rate_limited", now=0.0, retry_after=1.0)

    # The pause is over, but `a` has not gone out again yet, so `b` must not overtake it.
    late = outbox.add("lobby", "b", "2", None, now=5.0)

    assert late is None
    assert ids(outbox.due(5.0)) == ["a", "b"]


def test_repeated_rate_limit_extends_pause() -> None:
    outbox = connected_outbox()
    outbox.add("lobby", "a", "1", None, now=0.0)
    outbox.add("lobby", "b", "2", None, now=0.0)

    outbox.on_error("lobby", "a", "rate_limited", now=0.0, retry_after=1.0)
    outbox.on_error("lobby", "b", "rate_limited", now=0.0, retry_after=3.0)

    assert outbox.due(2.0) == []
    assert ids(outbox.due(3.0)) == ["a", "b"]


def test_reconnect_resends_all_in_add_order() -> None:
    outbox = connected_outbox()
    for index, room in enumerate(["lobby", "kitchen", "lobby", "lobby", "kitchen"]):
        outbox.add(room, f"m{index}", str(index), None, now=float(index))
    outbox.on_sent("lobby", "m2", seq=1, dup=False)

    outbox.on_disconnect()
    queued = outbox.add("lobby", "m5", "5", None, now=6.0)
    assert queued is None
    assert outbox.due(1000.0) == []

    resent = outbox.on_reconnect(now=10.0)

    assert ids(resent) == ["m0", "m1", "m3", "m4", "m5"]
    assert [entry.deadline for entry in resent] == [20.0] * 5
    # m5 never went out before, so it is not a resend.
    assert outbox.statistics().resends == 4


def test_reconnect_restarts_backoff_and_clears_pause() -> None:
    outbox = connected_outbox(send_timeout=1.0, backoff_cap=100.0)
    outbox.add("lobby", "a", "1", None, now=0.0)
    for now in (1.0, 3.0, 7.0):
        assert ids(outbox.due(now)) == ["a"]
    outbox.on_error("lobby", "a", "rate_limited", now=7.5, retry_after=60.0)

    outbox.on_disconnect()
    resent = outbox.on_reconnect(now=8.0)

    assert ids(resent) == ["a"]
    assert outbox.next_deadline() == 9.0


def test_restore_keeps_ids_and_order() -> None:
    outbox = Outbox(id_prefix="new")
    saved = [("lobby", "c-old-1", "one", None), ("lobby", "c-old-2", "two", {"k": 1})]

    outbox.restore(saved, now=0.0)
    resent = outbox.on_reconnect(now=1.0)

    assert [(e.room, e.id, e.body, e.meta) for e in resent] == saved
    assert outbox.new_id() == "c-new-1"


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="send_timeout"):
        Outbox(send_timeout=0)
    with pytest.raises(ValueError, match="backoff_cap"):
        Outbox(send_timeout=5.0, backoff_cap=1.0)


def test_lossy_link_stores_each_send_once() -> None:
    """A seeded fake server that drops frames and replies stores every send exactly once, in order."""
    rng = random.Random(7)
    outbox = Outbox(send_timeout=1.0, backoff_cap=8.0, id_prefix="p")
    outbox.on_reconnect(0.0)
    stored: dict[str, int] = {}
    store_order: list[str] = []
    now = 0.0

    def server_receives(entry: PendingSend) -> None:
        if rng.random() < 0.3:
            return
        dup = entry.id in stored
        if not dup:
            stored[entry.id] = len(stored) + 1
            store_order.append(entry.id)
        if rng.random() < 0.3:
            return
        outbox.on_sent(entry.room, entry.id, stored[entry.id], dup)

    added = []
    for index in range(50):
        message_id = outbox.new_id()
        added.append(message_id)
        entry = outbox.add("lobby", message_id, f"line {index}", None, now)
        assert entry is not None
        server_receives(entry)
        now += 0.1

    for _ in range(10_000):
        deadline = outbox.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline)
        for entry in outbox.due(now):
            server_receives(entry)

    assert outbox.pending() == []
    assert sorted(stored) == sorted(added)
    assert len(store_order) == len(set(store_order))


@pytest.mark.parametrize("module", ["parley.protocol.outbox", "parley.protocol.receiver"])
def test_state_machines_import_no_io(module: str) -> None:
    source = Path(importlib.import_module(module).__file__ or "").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module.split(".")[0])

    assert not imported & {"asyncio", "socket", "websockets", "threading", "time", "selectors"}
