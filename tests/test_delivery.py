"""The server's delivery state machine, driven by a fake clock: resend, backoff, give-up."""

from __future__ import annotations

import itertools

from parley.protocol.delivery import DeliveryTracker, Follow, GiveUp, Resend


def run_until(
    tracker: DeliveryTracker, start: float, end: float, step: float = 0.05
) -> list[tuple[float, object]]:
    """Poll the tracker every `step` seconds of fake time; return (time, action) pairs."""
    seen: list[tuple[float, object]] = []
    now = start
    while now <= end:
        seen.extend((now, action) for action in tracker.poll(now))
        now = round(now + step, 6)
    return seen


def test_acknowledged_follow_is_never_resent() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0)
    follow = Follow("lobby", 0)
    tracker.on_sent(follow, 3, now=0.0)
    tracker.on_ack(follow, 3, now=0.5)

    assert run_until(tracker, 0.0, 10.0) == []
    assert tracker.armed() == 0


def test_resend_between_one_and_two_timeouts() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0)
    follow = Follow("lobby", 4)
    tracker.on_sent(follow, 7, now=0.3)

    actions = run_until(tracker, 0.3, 2.5)

    assert len(actions) == 1
    when, action = actions[0]
    assert isinstance(action, Resend)
    assert (action.first, action.last) == (5, 7)
    assert 1.3 <= when <= 2.3 + 0.05


def test_resend_waits_double_each_try_then_gives_up() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0, max_tries=3)
    follow = Follow("lobby", 0)
    tracker.on_sent(follow, 1, now=0.0)

    actions = run_until(tracker, 0.0, 40.0)
    kinds = [type(action) for _, action in actions]
    times = [when for when, _ in actions]

    assert kinds == [Resend, Resend, Resend, GiveUp]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 2.0
    assert gaps[1] >= 4.0
    assert gaps[2] >= 8.0
    assert run_until(tracker, 40.0, 80.0) == []


def test_progress_resets_tries_and_deadline() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0, max_tries=3)
    follow = Follow("lobby", 0)
    tracker.on_sent(follow, 10, now=0.0)
    first = run_until(tracker, 0.0, 2.1)
    assert [type(action) for _, action in first] == [Resend]
    assert follow.tries == 1

    assert tracker.on_ack(follow, 6, now=2.2)
    assert run_until(tracker, 2.15, 3.1) == []

    later = run_until(tracker, 3.15, 5.5)
    assert len(later) == 1
    _, action = later[0]
    assert isinstance(action, Resend)
    assert (action.first, action.last) == (7, 10)
    assert follow.tries == 1


def test_older_ack_changes_nothing() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0)
    follow = Follow("lobby", 0)
    tracker.on_sent(follow, 5, now=0.0)

    assert tracker.on_ack(follow, 4, now=0.1)
    assert not tracker.on_ack(follow, 2, now=0.2)
    assert not tracker.on_ack(follow, 4, now=0.3)
    assert follow.acked == 4


def test_forget_disarms() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0)
    follow = Follow("lobby", 0)
    tracker.on_sent(follow, 2, now=0.0)
    tracker.forget(follow)

    assert run_until(tracker, 0.0, 10.0) == []
    assert tracker.next_deadline() is None


def test_next_deadline_follows_the_wheel() -> None:
    tracker = DeliveryTracker(ack_timeout=0.5)
    assert tracker.next_deadline() is None
    tracker.on_sent(Follow("a", 0), 1, now=1.2)

    deadline = tracker.next_deadline()
    assert deadline is not None
    assert 1.7 <= deadline <= 2.2


def test_rewind_moves_sent_back() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0)
    follow = Follow("lobby", 0)
    tracker.on_sent(follow, 9, now=0.0)
    tracker.on_ack(follow, 3, now=0.1)
    tracker.rewind(follow, 3)

    assert follow.sent == 3
    assert follow.acked == 3
    assert follow.outstanding == 0


def test_many_follows_share_one_wheel() -> None:
    tracker = DeliveryTracker(ack_timeout=1.0)
    follows = [Follow("big", 0) for _ in range(1000)]
    for follow in follows:
        tracker.on_sent(follow, 1, now=0.0)
    for follow in follows[::2]:
        tracker.on_ack(follow, 1, now=0.5)

    actions = run_until(tracker, 0.0, 2.5)

    resent = {id(action.follow) for _, action in actions if isinstance(action, Resend)}
    assert resent == {id(follow) for follow in follows[1::2]}
