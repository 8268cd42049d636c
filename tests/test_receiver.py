"""The client receiver: dedup, gaps, resets, positions and coalesced acks, driven by a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from parley.protocol.receiver import (
    Deliver,
    Duplicate,
    Gap,
    MalformedFrame,
    NotFollowed,
    Position,
    Receiver,
    message_from_frame,
)


def joined(
    room: str = "lobby", epoch: str = "e1", head: int = 0, since: int = 0, **extra: Any
) -> dict[str, Any]:
    return {"type": "joined", "room": room, "epoch": epoch, "head": head, "since": since, **extra}


def msg(seq: int, room: str = "lobby", body: str | None = None) -> dict[str, Any]:
    return {
        "type": "msg",
        "room": room,
        "seq": seq,
        "id": f"c-x-{seq}",
        "from": "bob",
        "ts": 1_765_000_000_000 + seq,
        "body": body if body is not None else f"message {seq}",
    }


def delivered_seqs(receiver: Receiver, seqs: list[int], room: str = "lobby") -> list[int]:
    out = []
    for seq in seqs:
        outcome = receiver.on_msg(msg(seq, room))
        if isinstance(outcome, Deliver):
            out.append(outcome.message.seq)
    return out


def test_in_order_messages_delivered() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(head=3, since=0))

    outcomes = [receiver.on_msg(msg(seq)) for seq in (1, 2, 3)]

    assert all(isinstance(outcome, Deliver) for outcome in outcomes)
    first = outcomes[0]
    assert isinstance(first, Deliver)
    assert first.message.sender == "bob"
    assert first.message.body == "message 1"
    assert first.message.ts == 1_765_000_000_001
    assert receiver.position("lobby") == Position(3, "e1")


def test_duplicates_dropped() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))

    assert delivered_seqs(receiver, [1, 2, 1, 2, 3, 3, 2]) == [1, 2, 3]
    assert isinstance(receiver.on_msg(msg(1)), Duplicate)
    assert receiver.statistics().duplicates == 5


def test_gap_requests_join_once() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=10))

    first = receiver.on_msg(msg(13))
    second = receiver.on_msg(msg(14))

    assert isinstance(first, Gap)
    assert first.expected == 11
    assert first.received == 13
    assert first.position == Position(10, "e1")
    assert first.request_join is True
    assert isinstance(second, Gap)
    assert second.request_join is False
    assert receiver.position("lobby") == Position(10, "e1")
    assert receiver.statistics().gaps == 2


def test_gap_join_request_rearmed_by_joined() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=10))
    receiver.on_msg(msg(13))

    receiver.on_joined(joined(head=14, since=10))
    replayed = delivered_seqs(receiver, [11, 12, 13, 14])
    again = receiver.on_msg(msg(16))

    assert replayed == [11, 12, 13, 14]
    assert isinstance(again, Gap)
    assert again.request_join is True


def test_gap_join_request_rearmed_by_reconnect() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    receiver.on_msg(msg(5))

    receiver.on_disconnect()
    outcome = receiver.on_msg(msg(6))

    assert isinstance(outcome, Gap)
    assert outcome.request_join is True


def test_message_for_unfollowed_room() -> None:
    receiver = Receiver()

    outcome = receiver.on_msg(msg(1, room="kitchen"))

    assert isinstance(outcome, NotFollowed)
    assert outcome.room == "kitchen"


def test_rejoin_from_earlier_since_drops_replayed() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3])

    info = receiver.on_joined(joined(head=5, since=1))

    assert info.reset is False
    assert delivered_seqs(receiver, [2, 3, 4, 5]) == [4, 5]


def test_rejoin_from_later_since_keeps_own_position() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=3))

    receiver.on_joined(joined(head=20, since=10))
    outcome = receiver.on_msg(msg(11))

    assert receiver.position("lobby") == Position(3, "e1")
    assert isinstance(outcome, Gap)
    assert outcome.position == Position(3, "e1")


def test_reset_flag_drops_room_state() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3])
    receiver.handled("lobby", 3)
    generation = receiver.generation("lobby")

    info = receiver.on_joined(joined(epoch="e1", head=2, since=0, reset=True))

    assert info.reset is True
    assert receiver.position("lobby") == Position(0, "e1")
    assert receiver.handled_positions() == {"lobby": Position(0, "e1")}
    assert receiver.generation("lobby") == (generation or 0) + 1
    assert delivered_seqs(receiver, [1, 2]) == [1, 2]
    assert receiver.statistics().resets == 1


def test_epoch_change_without_flag_is_reset() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(epoch="e1", since=0))
    delivered_seqs(receiver, [1, 2, 3, 4])

    info = receiver.on_joined(joined(epoch="e2", head=1, since=0))

    assert info.reset is True
    assert receiver.position("lobby") == Position(0, "e2")
    assert delivered_seqs(receiver, [1]) == [1]


def test_handled_from_old_generation_ignored() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    first = receiver.on_msg(msg(1))
    assert isinstance(first, Deliver)
    receiver.on_joined(joined(epoch="e2", since=0, reset=True))
    delivered_seqs(receiver, [1])

    moved = receiver.handled("lobby", 1, generation=first.generation)

    assert moved is False
    assert receiver.handled_positions()["lobby"] == Position(0, "e2")


def test_handled_never_passes_since_or_moves_back() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2])

    assert receiver.handled("lobby", 5) is True
    assert receiver.handled_positions()["lobby"] == Position(2, "e1")
    assert receiver.handled("lobby", 1) is False
    assert receiver.handled("lobby", 2) is False
    assert receiver.handled("kitchen", 1) is False


def test_first_ack_immediate_then_coalesced() -> None:
    receiver = Receiver(ack_interval=0.1)
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3, 4])

    receiver.handled("lobby", 1)
    first = receiver.acks_due(now=10.0)
    receiver.handled("lobby", 2)
    receiver.handled("lobby", 3)
    too_soon = receiver.acks_due(now=10.05)
    deadline = receiver.next_ack_deadline()
    coalesced = receiver.acks_due(now=10.1)

    assert first == [("lobby", 1)]
    assert too_soon == []
    assert deadline == pytest.approx(10.1)
    assert coalesced == [("lobby", 3)]
    assert receiver.acks_due(now=100.0) == []
    assert receiver.next_ack_deadline() is None


def test_large_room_hint_slows_acks() -> None:
    receiver = Receiver(ack_interval=0.1)
    receiver.on_joined({**joined(since=0), "ack_interval": 1000})
    delivered_seqs(receiver, [1, 2, 3])

    receiver.handled("lobby", 1)
    first = receiver.acks_due(now=10.0)
    receiver.handled("lobby", 3)
    after_default = receiver.acks_due(now=10.5)
    deadline = receiver.next_ack_deadline()
    after_hint = receiver.acks_due(now=11.0)

    assert first == [("lobby", 1)]
    assert after_default == []
    assert deadline == pytest.approx(11.0)
    assert after_hint == [("lobby", 3)]


def test_acks_coalesced_per_room() -> None:
    receiver = Receiver(ack_interval=0.1)
    for room in ("lobby", "kitchen"):
        receiver.on_joined(joined(room=room, since=0))
        delivered_seqs(receiver, [1, 2], room=room)

    receiver.handled("lobby", 2)
    receiver.handled("kitchen", 1)
    both = receiver.acks_due(now=0.0)
    receiver.handled("kitchen", 2)
    later = receiver.acks_due(now=0.2)

    assert sorted(both) == [("kitchen", 1), ("lobby", 2)]
    assert later == [("kitchen", 2)]


def test_acked_beyond_handled_suppresses_ack() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3])

    receiver.on_acked("lobby", 5)
    receiver.handled("lobby", 3)

    assert receiver.acks_due(now=0.0) == []


def test_unconfirmed_ack_repeated_after_reconnect() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3])
    receiver.handled("lobby", 2)
    assert receiver.acks_due(now=0.0) == [("lobby", 2)]
    receiver.on_acked("lobby", 1)

    receiver.on_disconnect()

    assert receiver.acks_due(now=0.01) == [("lobby", 2)]


def test_confirmed_ack_not_repeated_after_reconnect() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2])
    receiver.handled("lobby", 2)
    receiver.acks_due(now=0.0)
    receiver.on_acked("lobby", 2)

    receiver.on_disconnect()

    assert receiver.acks_due(now=1.0) == []


def test_restored_position_resumes_and_acks() -> None:
    receiver = Receiver()
    receiver.restore("lobby", Position(41, "e1"))

    resume = receiver.resume_positions()
    acks = receiver.acks_due(now=0.0)
    receiver.on_joined(joined(head=43, since=41))

    assert resume == {"lobby": Position(41, "e1")}
    assert resume["lobby"].to_fields() == {"since": 41, "epoch": "e1"}
    assert acks == [("lobby", 41)]
    assert delivered_seqs(receiver, [41, 42, 43]) == [42, 43]


def test_resume_and_handled_positions_differ() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3])
    receiver.handled("lobby", 1)

    assert receiver.resume_positions() == {"lobby": Position(3, "e1")}
    assert receiver.handled_positions() == {"lobby": Position(1, "e1")}


def test_left_room_forgotten() -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))

    receiver.on_left("lobby")

    assert receiver.position("lobby") is None
    assert receiver.rooms() == []
    assert isinstance(receiver.on_msg(msg(1)), NotFollowed)


def test_position_without_epoch_omits_field() -> None:
    assert Position(3).to_fields() == {"since": 3}


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", "1"), ("seq", True), ("from", None), ("body", 5), ("ts", 1.5), ("room", 3), ("id", None)],
)
def test_malformed_msg_rejected(field: str, value: Any) -> None:
    receiver = Receiver()
    receiver.on_joined(joined(since=0))
    frame = msg(1)
    if value is None:
        del frame[field]
    else:
        frame[field] = value

    with pytest.raises(MalformedFrame) as raised:
        receiver.on_msg(frame)

    assert raised.value.field == field
    assert receiver.position("lobby") == Position(0, "e1")


def test_malformed_joined_rejected() -> None:
    receiver = Receiver()
    frame = joined()
    del frame["epoch"]

    with pytest.raises(MalformedFrame, match="epoch"):
        receiver.on_joined(frame)


def test_history_entry_takes_room_from_request() -> None:
    entry = msg(4)
    del entry["room"]
    entry["meta"] = {"reply_to": 2}

    message = message_from_frame(entry, room="lobby")

    assert message.room == "lobby"
    assert message.meta == {"reply_to": 2}


def test_negative_ack_interval_rejected() -> None:
    with pytest.raises(ValueError, match="ack_interval"):
        Receiver(ack_interval=-1)


def test_acked_hint_slows_acks_later() -> None:
    receiver = Receiver(ack_interval=0.1)
    receiver.on_joined(joined(since=0))
    delivered_seqs(receiver, [1, 2, 3])
    receiver.handled("lobby", 1)
    assert receiver.acks_due(now=10.0) == [("lobby", 1)]

    receiver.on_acked("lobby", 1, 2000)
    receiver.handled("lobby", 3)

    assert receiver.acks_due(now=10.5) == []
    assert receiver.acks_due(now=12.0) == [("lobby", 3)]
