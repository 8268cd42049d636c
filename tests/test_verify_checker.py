"""The verify checker on hand-written histories: each broken guarantee is reported, a clean run is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from parley.verify.checker import CheckResult, StoredMessage, StoreSnapshot, check
from parley.verify.history import (
    Acked,
    CursorSample,
    Deliver,
    DuplicateSend,
    Event,
    HistoryFormatError,
    HistoryWriter,
    Joined,
    Send,
    SendFailed,
    Sent,
    Start,
    Stop,
    decode_event,
    encode_event,
    read_history,
)

ROOM = "r"
EPOCH = "e1"
# (seq, sender, id, body) of the four messages in the clean run.
MESSAGES = [
    (1, "a", "a-1", "a/0/1"),
    (2, "a", "a-2", "a/0/2"),
    (3, "a", "a-3", "a/0/3"),
    (4, "b", "b-1", "b/0/1"),
]


def stored(rows: list[tuple[int, str, str, str]] = MESSAGES, room: str = ROOM) -> list[StoredMessage]:
    return [StoredMessage(room, seq, id, sender, body) for seq, sender, id, body in rows]


def snapshot(rows: list[tuple[int, str, str, str]] = MESSAGES, head: int = 4) -> StoreSnapshot:
    return StoreSnapshot(
        messages={ROOM: stored(rows)},
        heads={ROOM: head},
        epochs={ROOM: EPOCH},
        cursors={("a", ROOM): head, ("b", ROOM): head},
    )


def deliveries(*seqs: int) -> list[Event]:
    by_seq = {seq: (sender, id) for seq, sender, id, _ in MESSAGES}
    return [Deliver(ROOM, seq, by_seq[seq][1], by_seq[seq][0]) for seq in seqs]


def sends(sender: str) -> list[Event]:
    events: list[Event] = []
    for seq, who, id, body in MESSAGES:
        if who == sender:
            events += [Send(ROOM, body), Sent(ROOM, body, id, seq)]
    return events


def client(sender: str, delivered: list[Event], acked: int = 4) -> list[Event]:
    """A client's history: it starts fresh, joins at 0, sends its messages, is handed `delivered`."""
    return [
        Start(0),
        Joined(ROOM, since=0, head=0, epoch=EPOCH),
        *sends(sender),
        *delivered,
        Acked(ROOM, acked),
        Stop("close", final=True),
    ]


def clean() -> dict[str, list[Event]]:
    return {"a": client("a", deliveries(1, 2, 3, 4)), "b": client("b", deliveries(1, 2, 3, 4))}


def kinds(result: CheckResult) -> list[str]:
    return [violation.kind for violation in result.violations]


def test_clean_history_reports_nothing() -> None:
    result = check(clean(), snapshot())

    assert result.violations == []
    assert result.ok
    assert result.sends == 4
    assert result.confirmed == 4
    assert result.stored == 4
    assert result.delivered == 8
    assert result.unconfirmed == 0


def test_lost_delivery_in_the_middle() -> None:
    histories = clean()
    histories["b"] = client("b", deliveries(1, 3, 4))

    result = check(histories, snapshot())

    assert kinds(result) == ["lost_delivery"]
    violation = result.violations[0]
    assert (violation.room, violation.seq, violation.client) == (ROOM, 2, "b")
    assert "seq 2 never reached the application" in violation.explain()


def test_lost_delivery_after_final_drain() -> None:
    histories = clean()
    histories["b"] = client("b", deliveries(1, 2), acked=2)
    store = snapshot()
    assert store.cursors is not None
    store.cursors[("b", ROOM)] = 2

    result = check(histories, store)

    assert kinds(result) == ["lost_delivery"]
    assert result.violations[0].seq == 3
    assert "head is 4" in result.violations[0].detail


def test_missing_tail_not_reported_without_final_drain() -> None:
    histories = clean()
    histories["b"] = [*client("b", deliveries(1, 2), acked=2)[:-1], Stop("crash")]
    store = snapshot()
    assert store.cursors is not None
    store.cursors[("b", ROOM)] = 2

    assert kinds(check(histories, store)) == []


def test_confirmed_send_missing_from_store() -> None:
    histories = clean()
    histories["a"] = client("a", deliveries(1, 2, 3), acked=3)
    histories["b"] = client("b", deliveries(1, 2, 3), acked=3)
    store = snapshot(MESSAGES[:3], head=3)

    result = check(histories, store)

    assert kinds(result) == ["lost_sent"]
    violation = result.violations[0]
    assert (violation.seq, violation.client) == (4, "b")
    assert "not in the store" in violation.detail


def test_duplicate_delivery() -> None:
    histories = clean()
    histories["b"] = client("b", deliveries(1, 2, 2, 3, 4))

    result = check(histories, snapshot())

    assert kinds(result) == ["duplicate_delivery"]
    assert (result.violations[0].seq, result.violations[0].client) == (2, "b")


def test_delivery_below_start_position_is_duplicate() -> None:
    histories = clean()
    histories["b"] = [
        Start(0, {ROOM: 2}),
        *sends("b"),
        *deliveries(2, 3, 4),
        Acked(ROOM, 4),
        Stop("close", final=True),
    ]

    result = check(histories, snapshot())

    assert kinds(result) == ["duplicate_delivery"]
    assert "position it resumed from" in result.violations[0].detail


def test_reordered_delivery() -> None:
    histories = clean()
    histories["b"] = client("b", deliveries(1, 3, 2, 4))

    result = check(histories, snapshot())

    assert kinds(result) == ["reordered_delivery"]
    violation = result.violations[0]
    assert (violation.seq, violation.client) == (2, "b")
    assert "after seq 3" in violation.detail


def test_reused_seq_in_store() -> None:
    rows = [*MESSAGES, (2, "b", "b-2", "b/0/2")]
    histories = clean()
    histories["b"] = [*histories["b"][:-1], Send(ROOM, "b/0/2"), Stop("close", final=True)]

    result = check(histories, snapshot(rows))

    assert "seq_reused" in kinds(result)
    reused = next(v for v in result.violations if v.kind == "seq_reused")
    assert reused.seq == 2
    assert "two messages under this seq" in reused.detail


def test_reused_seq_in_confirmations() -> None:
    histories = clean()
    # The server confirmed b's message as seq 3, which a's third message also got.
    histories["b"] = [
        *histories["b"][:2],
        Send(ROOM, "b/0/1"),
        Sent(ROOM, "b/0/1", "b-1", 3),
        *histories["b"][4:],
    ]

    result = check(histories, snapshot())

    assert sorted(kinds(result)) == ["sent_seq_mismatch", "seq_reused"]
    reused = next(v for v in result.violations if v.kind == "seq_reused")
    assert (reused.seq, reused.client) == (3, "b")


def test_skipped_seq_in_store() -> None:
    rows = [MESSAGES[0], MESSAGES[1], (4, "b", "b-1", "b/0/1")]
    histories = {
        "a": [Start(0), Joined(ROOM, 0, 0, EPOCH), *sends("a")[:4], *deliveries(1, 2), Stop("close")],
        "b": [Start(0), Joined(ROOM, 0, 0, EPOCH), *sends("b"), Stop("close")],
    }

    store = snapshot(rows)
    store.cursors = None

    result = check(histories, store)

    assert kinds(result) == ["seq_skipped"]
    assert result.violations[0].seq == 3


def test_duplicate_room_sender_id_in_store() -> None:
    rows = [*MESSAGES, (5, "b", "b-1", "b/0/1")]
    store = snapshot(rows, head=5)

    result = check(clean(), store)

    assert "duplicate_id" in kinds(result)
    violation = next(v for v in result.violations if v.kind == "duplicate_id")
    assert (violation.seq, violation.client) == (5, "b")
    assert "stored 2 times" in violation.detail


def test_unconfirmed_send_stored_twice_under_new_id() -> None:
    rows = [*MESSAGES, (5, "b", "b-2", "b/0/2"), (6, "b", "b-3", "b/0/2")]
    histories = clean()
    histories["b"] = [*histories["b"][:-1], Send(ROOM, "b/0/2"), Stop("crash")]

    result = check(histories, snapshot(rows, head=6))

    assert "unconfirmed_stored_twice" in kinds(result)
    assert result.unconfirmed == 1


def test_unconfirmed_send_stored_once_is_fine() -> None:
    rows = [*MESSAGES, (5, "b", "b-2", "b/0/2")]
    histories = clean()
    # Neither client drained at the end, so neither had to receive seq 5.
    histories["a"][-1] = Stop("crash")
    histories["b"] = [*histories["b"][:-1], Send(ROOM, "b/0/2"), Stop("crash")]

    store = snapshot(rows, head=5)
    store.cursors = {("a", ROOM): 4, ("b", ROOM): 4}

    result = check(histories, store)

    assert kinds(result) == []
    assert result.unconfirmed == 1


def test_cursor_moving_back_in_acked() -> None:
    histories = clean()
    histories["b"] = [*histories["b"][:-1], Acked(ROOM, 2), Stop("close", final=True)]

    result = check(histories, snapshot())

    assert kinds(result) == ["cursor_backwards"]
    assert "`acked` reported cursor 2 after 4" in result.violations[0].detail


def test_cursor_moving_back_in_samples() -> None:
    samples = [CursorSample("b", ROOM, 3, t=1.0), CursorSample("b", ROOM, 1, t=2.0)]

    result = check(clean(), snapshot(), samples)

    assert kinds(result) == ["cursor_backwards"]
    assert result.violations[0].seq == 1


def test_final_cursor_below_acked() -> None:
    store = snapshot()
    assert store.cursors is not None
    store.cursors[("a", ROOM)] = 2

    result = check(clean(), store)

    assert kinds(result) == ["cursor_backwards"]
    assert result.violations[0].client == "a"


def test_cursor_ahead_of_handled() -> None:
    histories = clean()
    histories["b"] = [*client("b", deliveries(1, 2), acked=4)[:-1], Stop("crash")]

    result = check(histories, snapshot())

    assert set(kinds(result)) == {"cursor_ahead"}
    assert result.violations[0].client == "b"


def test_sent_seq_disagrees_with_store() -> None:
    histories = clean()
    histories["a"] = [
        Start(0),
        Joined(ROOM, 0, 0, EPOCH),
        Send(ROOM, "a/0/1"),
        Sent(ROOM, "a/0/1", "a-1", 1),
        Send(ROOM, "a/0/2"),
        Sent(ROOM, "a/0/2", "a-2", 7),
        Send(ROOM, "a/0/3"),
        Sent(ROOM, "a/0/3", "a-3", 3),
        *deliveries(1, 2, 3, 4),
        Acked(ROOM, 4),
        Stop("close", final=True),
    ]

    result = check(histories, snapshot())

    assert kinds(result) == ["sent_seq_mismatch"]
    violation = result.violations[0]
    assert (violation.seq, violation.client) == (7, "a")
    assert "stored at seq 2" in violation.detail


def test_replayed_send_reply_with_other_seq() -> None:
    histories = clean()
    histories["a"] = [
        *histories["a"][:-1],
        DuplicateSend(ROOM, "a/0/1", "a-1", seq=9),
        Stop("close", final=True),
    ]

    result = check(histories, snapshot())

    assert kinds(result) == ["sent_seq_mismatch"]
    assert result.duplicate_sends == 1


def test_body_stored_differently() -> None:
    rows = [(1, "a", "a-1", "a/0/1 changed"), *MESSAGES[1:]]
    histories = clean()

    result = check(histories, snapshot(rows))

    assert sorted(set(kinds(result))) == ["body_mismatch", "phantom_message"]


def test_failed_send_stored() -> None:
    histories = clean()
    histories["b"] = [*histories["b"][:2], SendFailed(ROOM, "b/0/1", "invalid_field"), *histories["b"][2:]]

    result = check(histories, snapshot())

    assert "failed_but_stored" in kinds(result)


def test_delivered_message_differs_from_store() -> None:
    histories = clean()
    histories["b"] = client("b", [*deliveries(1, 2, 3), Deliver(ROOM, 4, "x-1", "x")])

    result = check(histories, snapshot())

    assert kinds(result) == ["delivery_mismatch"]
    assert "expected the stored id 'b-1'" in result.violations[0].detail


def test_reset_reported() -> None:
    histories = clean()
    histories["b"].insert(2, Joined(ROOM, since=0, head=4, epoch="e2", reset=True))

    result = check(histories, snapshot())

    assert kinds(result) == ["reset"]


def test_restart_redelivers_after_saved_position() -> None:
    histories = clean()
    histories["b"] = [
        Start(0),
        Joined(ROOM, 0, 0, EPOCH),
        *sends("b"),
        *deliveries(1, 2, 3),
        Stop("crash"),
        Start(1, {ROOM: 2}),
        *deliveries(3, 4),
        Acked(ROOM, 4),
        Stop("close", final=True),
    ]

    result = check(histories, snapshot())

    assert kinds(result) == []
    assert result.redelivered_after_restart == 1
    assert result.incarnations == 3


def test_restart_beyond_handled_loses_messages() -> None:
    histories = clean()
    histories["b"] = [
        Start(0),
        Joined(ROOM, 0, 0, EPOCH),
        *sends("b"),
        *deliveries(1),
        Stop("crash"),
        Start(1, {ROOM: 3}),
        *deliveries(4),
        Acked(ROOM, 4),
        Stop("close", final=True),
    ]

    result = check(histories, snapshot())

    assert kinds(result) == ["lost_delivery"]
    assert result.violations[0].seq == 2
    assert "restarted from seq 3" in result.violations[0].detail


def test_restart_position_moving_back() -> None:
    histories = clean()
    histories["b"] = [
        Start(0, {ROOM: 2}),
        *sends("b"),
        *deliveries(3),
        Stop("crash"),
        Start(1, {ROOM: 1}),
        *deliveries(2, 3, 4),
        Acked(ROOM, 4),
        Stop("close", final=True),
    ]

    result = check(histories, snapshot())

    assert kinds(result) == ["position_backwards"]


def test_phantom_message() -> None:
    rows = [*MESSAGES, (5, "c", "c-1", "c/0/1")]

    result = check(clean(), snapshot(rows, head=5))

    assert "phantom_message" in kinds(result)


def test_event_round_trip() -> None:
    events: list[Event] = [
        Start(2, {ROOM: 5}, t=1.5),
        Joined(ROOM, 5, 9, EPOCH, reset=False, t=1.6),
        Send(ROOM, "b/2/1"),
        Sent(ROOM, "b/2/1", "b-9", 10, dup=True),
        SendFailed(ROOM, "b/2/2", "invalid_field"),
        DuplicateSend(ROOM, "b/2/1", "b-9", None),
        Deliver(ROOM, 6, "a-6", "a"),
        Acked(ROOM, 6),
        Stop("crash", stats={"resends": 3}),
    ]

    for event in events:
        assert decode_event(encode_event(event)) == event
    assert b'"from":"a"' in encode_event(events[6])


def test_history_file_with_cut_last_line(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path / "a.jsonl", started=0.0)
    writer.write(Start(0))
    writer.write(Deliver(ROOM, 1, "a-1", "a"))
    writer.close()
    with open(tmp_path / "a.jsonl", "ab") as file:
        file.write(b'{"e":"deliver","room":"r","se')

    events = read_history(tmp_path / "a.jsonl")

    assert events == [Start(0), Deliver(ROOM, 1, "a-1", "a")]


def test_history_invalid_line_in_middle(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"e":"start","incarnation":0}\n{"e":"nope"}\n{"e":"start","incarnation":1}\n')

    with pytest.raises(HistoryFormatError, match=r"a\.jsonl:2:"):
        read_history(path)
