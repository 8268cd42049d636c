"""The checker: compares every client's recorded history with the store, free of IO.

What it checks, with the violation kind each failure is reported as:

- The store. A room's seqs are exactly 1..head: a missing seq is `seq_skipped`, two messages under one
  seq are `seq_reused`, two messages under one `(room, sender, id)` are `duplicate_id`.
- Sends, each named by `(room, sender, body)` because the workload never repeats a body. A body stored
  under two ids (a retry that changed the id) is `unconfirmed_stored_twice` when the sender never saw a
  confirmation and `duplicate_message` otherwise. A stored body that no client asked to send is
  `phantom_message`. A confirmed send is stored, else `lost_sent`, at the seq the confirmation reported,
  else `sent_seq_mismatch`, with the body the application gave, else `body_mismatch`. Two different
  messages confirmed under one `(room, seq)` are `seq_reused`. A send rejected with a final error is not
  stored, else `failed_but_stored`.
- Deliveries, per client and room. The application's durable state is the client's state file, so each
  incarnation starts at the position it loaded (or, without one, at the `since` of its first `joined`).
  Within an incarnation the client library must hand over every seq after the start exactly once and in
  order: `duplicate_delivery`, `reordered_delivery`, and `lost_delivery` for a seq below the highest one
  delivered that never came. A restarted client may receive again what lies after its saved position,
  which is counted as a redelivery, not a violation. But a saved position beyond what the application
  was handed is `lost_delivery`, and one below the previous incarnation's start is `position_backwards`.
  A client that ended with a final drain must hold the room up to the store's head, else
  `lost_delivery`. A delivered message must be the stored one, else `delivery_mismatch`. A `joined` with
  `reset`, or with an epoch other than the store's, is `reset`: the embedded store never loses history.
- Cursors, per user and room. The `acked` values a client saw, and the sampled stored cursors, never
  decrease (`cursor_backwards`), and the final stored cursor is at least every `acked` value. No cursor
  passes the highest seq that any incarnation of the user's application was handed (`cursor_ahead`),
  because then the server would never deliver the rest again.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from parley.verify.history import (
    Acked,
    CursorSample,
    Deliver,
    DuplicateSend,
    Event,
    Joined,
    Send,
    SendFailed,
    Sent,
    Start,
    Stop,
)

VIOLATION_KINDS = (
    "lost_sent",
    "sent_seq_mismatch",
    "body_mismatch",
    "failed_but_stored",
    "phantom_message",
    "seq_skipped",
    "seq_reused",
    "duplicate_id",
    "duplicate_message",
    "unconfirmed_stored_twice",
    "lost_delivery",
    "duplicate_delivery",
    "reordered_delivery",
    "delivery_mismatch",
    "position_backwards",
    "reset",
    "cursor_backwards",
    "cursor_ahead",
)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One stored message."""

    room: str
    seq: int
    id: str
    sender: str
    body: str


@dataclass(slots=True)
class StoreSnapshot:
    """The store's contents at the end of the run: messages, room heads and epochs, delivery cursors.

    `messages` lists every stored row of each room as read, so that a store that broke its own
    uniqueness rules shows it. `cursors` is None when the source cannot read cursors (HTTP).
    """

    messages: dict[str, list[StoredMessage]] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)
    cursors: dict[tuple[str, str], int | None] | None = None


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken guarantee, located by room, seq and client where they apply."""

    kind: str
    room: str
    seq: int | None
    client: str | None
    detail: str
    t: float | None = None

    def explain(self) -> str:
        """Return one line naming the kind, the place and what was expected."""
        where = [f"room {self.room}"]
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.client is not None:
            where.append(f"client {self.client}")
        if self.t is not None:
            where.append(f"at {self.t:.3f}s")
        return f"{self.kind}: {', '.join(where)}: {self.detail}"


@dataclass(slots=True)
class CheckResult:
    """The checker's counts and the violations found, in the order found."""

    violations: list[Violation] = field(default_factory=list)
    sends: int = 0
    confirmed: int = 0
    confirmed_as_duplicate: int = 0
    failed: int = 0
    unconfirmed: int = 0
    stored: int = 0
    delivered: int = 0
    redelivered_after_restart: int = 0
    duplicate_sends: int = 0
    acked: int = 0
    incarnations: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def counts_by_kind(self) -> dict[str, int]:
        """Return the number of violations of each kind that occurred."""
        return dict(Counter(violation.kind for violation in self.violations))


MessageKey = tuple[str, str, str]
"""(room, sender, id): the identity under which a message is stored once."""


def check(
    histories: Mapping[str, Sequence[Event]],
    store: StoreSnapshot,
    cursor_samples: Iterable[CursorSample] = (),
) -> CheckResult:
    """Check the histories of every client (keyed by client name, which is its user) against the store."""
    result = CheckResult()
    stored = _index_store(store, result)
    sends = _collect_sends(histories, result)
    _check_sends(sends, stored, result)
    handed = _check_deliveries(histories, store, stored, result)
    _check_cursors(histories, store, cursor_samples, handed, result)
    return result


@dataclass(slots=True)
class _StoreIndex:
    at_seq: dict[tuple[str, int], StoredMessage]
    by_id: dict[MessageKey, list[StoredMessage]]
    by_body: dict[MessageKey, list[StoredMessage]]


def _index_store(store: StoreSnapshot, result: CheckResult) -> _StoreIndex:
    at_seq: dict[tuple[str, int], StoredMessage] = {}
    by_id: dict[MessageKey, list[StoredMessage]] = defaultdict(list)
    by_body: dict[MessageKey, list[StoredMessage]] = defaultdict(list)

    for room in sorted(store.messages):
        rows = store.messages[room]
        result.stored += len(rows)
        for row in rows:
            earlier = at_seq.get((room, row.seq))
            if earlier is None:
                at_seq[(room, row.seq)] = row
            elif earlier != row:
                result.violations.append(
                    Violation(
                        "seq_reused",
                        room,
                        row.seq,
                        None,
                        f"the store holds two messages under this seq: id {earlier.id!r} from "
                        f"{earlier.sender!r} and id {row.id!r} from {row.sender!r}; expected one",
                    )
                )
            by_id[(room, row.sender, row.id)].append(row)
            by_body[(room, row.sender, row.body)].append(row)
        _check_seqs(room, store.heads.get(room, 0), rows, result)

    for (room, sender, id), rows in sorted(by_id.items()):
        if len(rows) > 1:
            result.violations.append(
                Violation(
                    "duplicate_id",
                    room,
                    rows[1].seq,
                    sender,
                    f"message id {id!r} from {sender!r} is stored {len(rows)} times, at seqs "
                    f"{[row.seq for row in rows]}; expected once per (room, sender, id)",
                )
            )
    return _StoreIndex(at_seq, dict(by_id), dict(by_body))


def _check_seqs(room: str, head: int, rows: list[StoredMessage], result: CheckResult) -> None:
    present = {row.seq for row in rows}
    top = max([head, *present])
    for first, last in _ranges(seq for seq in range(1, top + 1) if seq not in present):
        result.violations.append(
            Violation(
                "seq_skipped",
                room,
                first,
                None,
                f"the store has no message at {_span(first, last)} although the room's head is {head} "
                f"and its highest stored seq is {max(present, default=0)}; expected seqs 1..{head} "
                "without a gap",
            )
        )
    if top > head:
        result.violations.append(
            Violation(
                "seq_skipped",
                room,
                top,
                None,
                f"a message is stored at seq {top} beyond the room's head {head}; "
                "expected the head to be the highest seq",
            )
        )


@dataclass(slots=True)
class _SendRecord:
    """The recorded sends, confirmations and rejections of one message, named by (room, sender, body)."""

    asked: bool = False
    confirmations: list[tuple[str, int, float, str]] = field(default_factory=list)
    """(id, seq, time, source) of every `sent` or replayed-send reply."""
    failed: str | None = None


def _collect_sends(
    histories: Mapping[str, Sequence[Event]], result: CheckResult
) -> dict[MessageKey, _SendRecord]:
    sends: dict[MessageKey, _SendRecord] = {}
    for client, events in histories.items():
        for event in events:
            if isinstance(event, Send | Sent | SendFailed | DuplicateSend):
                record = sends.setdefault((event.room, client, event.body), _SendRecord())
            if isinstance(event, Send):
                if not record.asked:
                    result.sends += 1
                record.asked = True
            elif isinstance(event, Sent):
                record.confirmations.append((event.id, event.seq, event.t, "sent"))
                result.confirmed += 1
                if event.dup:
                    result.confirmed_as_duplicate += 1
            elif isinstance(event, DuplicateSend):
                result.duplicate_sends += 1
                if event.seq is not None:
                    record.confirmations.append(
                        (event.id, event.seq, event.t, "the reply to a replayed send")
                    )
            elif isinstance(event, SendFailed):
                record.failed = event.code
                result.failed += 1
    return sends


def _check_sends(sends: dict[MessageKey, _SendRecord], stored: _StoreIndex, result: CheckResult) -> None:
    confirmed_at: dict[tuple[str, int], MessageKey] = {}

    for key in sorted(sends):
        room, sender, body = key
        record = sends[key]
        rows = stored.by_body.get(key, [])
        if not record.confirmations and record.failed is None:
            result.unconfirmed += 1

        ids = sorted({row.id for row in rows})
        if len(ids) > 1:
            kind = "duplicate_message" if record.confirmations else "unconfirmed_stored_twice"
            result.violations.append(
                Violation(
                    kind,
                    room,
                    rows[1].seq,
                    sender,
                    f"body {_clip(body)!r} is stored {len(rows)} times under ids {ids}, at seqs "
                    f"{[row.seq for row in rows]}; expected one message however often it was retried",
                )
            )

        if record.failed is not None and rows:
            result.violations.append(
                Violation(
                    "failed_but_stored",
                    room,
                    rows[0].seq,
                    sender,
                    f"body {_clip(body)!r} was rejected with {record.failed!r} but is stored as id "
                    f"{rows[0].id!r}; expected it not to be stored",
                )
            )

        for id, seq, t, source in record.confirmations:
            _check_confirmation(key, id, seq, t, source, stored, result)
            other = confirmed_at.setdefault((room, seq), key)
            if other != key:
                result.violations.append(
                    Violation(
                        "seq_reused",
                        room,
                        seq,
                        sender,
                        f"seq {seq} was confirmed for body {_clip(body)!r} from {sender!r} and for body "
                        f"{_clip(other[2])!r} from {other[1]!r}; expected one message per seq",
                        t,
                    )
                )

    for key, rows in stored.by_body.items():
        if key not in sends:
            room, sender, body = key
            result.violations.append(
                Violation(
                    "phantom_message",
                    room,
                    rows[0].seq,
                    sender,
                    f"message id {rows[0].id!r} with body {_clip(body)!r} is stored, but no client recorded "
                    "sending it",
                )
            )


def _check_confirmation(
    key: MessageKey, id: str, seq: int, t: float, source: str, stored: _StoreIndex, result: CheckResult
) -> None:
    room, sender, body = key
    rows = stored.by_id.get((room, sender, id), [])
    if not rows:
        result.violations.append(
            Violation(
                "lost_sent",
                room,
                seq,
                sender,
                f"message id {id!r} was confirmed by {source} as seq {seq} but is not in the store",
                t,
            )
        )
        return
    if rows[0].seq != seq:
        result.violations.append(
            Violation(
                "sent_seq_mismatch",
                room,
                seq,
                sender,
                f"message id {id!r} was confirmed by {source} as seq {seq} but is stored at seq "
                f"{rows[0].seq}; expected the confirmed seq",
                t,
            )
        )
    if rows[0].body != body:
        result.violations.append(
            Violation(
                "body_mismatch",
                room,
                rows[0].seq,
                sender,
                f"message id {id!r} is stored with body {_clip(rows[0].body)!r}; expected {_clip(body)!r}",
                t,
            )
        )


@dataclass(slots=True)
class _Incarnation:
    """One room of one client incarnation, as delivery checking walks it."""

    start: int | None
    seen: set[int] = field(default_factory=set)
    highest: int = 0
    contiguous: int = 0

    def begin(self, start: int) -> None:
        self.start = start
        self.highest = start
        self.contiguous = start


def _check_deliveries(
    histories: Mapping[str, Sequence[Event]],
    store: StoreSnapshot,
    stored: _StoreIndex,
    result: CheckResult,
) -> dict[tuple[str, str], int]:
    """Check every client's deliveries; return the highest seq that each (user, room) had.

    A client has what was handed to its application and everything up to the position it started from.
    """
    handed: dict[tuple[str, str], int] = {}
    for client in sorted(histories):
        _check_client_deliveries(client, histories[client], store, stored, handed, result)
    return handed


def _check_client_deliveries(
    client: str,
    events: Sequence[Event],
    store: StoreSnapshot,
    stored: _StoreIndex,
    handed: dict[tuple[str, str], int],
    result: CheckResult,
) -> None:
    previous: dict[str, _Incarnation] = {}
    current: dict[str, _Incarnation] = {}
    positions: dict[str, int] = {}
    final = False

    for event in events:
        if isinstance(event, Start):
            _close_incarnation(client, current, previous, result)
            result.incarnations += 1
            positions = dict(event.positions)
            final = False
            for room, since in positions.items():
                _check_restart(client, room, since, previous.get(room), event.t, result)
        elif isinstance(event, Joined):
            _check_joined(client, event, store, result)
            state = current.setdefault(event.room, _Incarnation(None))
            if state.start is None:
                state.begin(positions.get(event.room, event.since))
                _raise_handed(handed, client, event.room, state.start)
        elif isinstance(event, Deliver):
            result.delivered += 1
            state = current.setdefault(event.room, _Incarnation(None))
            if state.start is None:
                # Neither a saved position nor a `joined` came first: take the first delivery as given.
                state.begin(positions.get(event.room, event.seq - 1))
            _check_delivery(client, event, state, previous.get(event.room), stored, result)
            _raise_handed(handed, client, event.room, event.seq)
        elif isinstance(event, Stop):
            final = event.final

    if final:
        for room, state in current.items():
            _check_complete(client, room, state, store, result)
    _close_incarnation(client, current, previous, result)


def _close_incarnation(
    client: str, current: dict[str, _Incarnation], previous: dict[str, _Incarnation], result: CheckResult
) -> None:
    """Report the holes each room of the ending incarnation left, and keep its state for the next one."""
    for room, state in current.items():
        _report_holes(client, room, state, result)
        previous[room] = state
    current.clear()


def _raise_handed(handed: dict[tuple[str, str], int], client: str, room: str, seq: int | None) -> None:
    """Record that the client's application has `room` up to `seq`, from a delivery or its start."""
    if seq is not None:
        handed[(client, room)] = max(handed.get((client, room), 0), seq)


def _check_restart(
    client: str, room: str, since: int, before: _Incarnation | None, t: float, result: CheckResult
) -> None:
    if before is None or before.start is None:
        return
    if since < before.start:
        result.violations.append(
            Violation(
                "position_backwards",
                room,
                since,
                client,
                f"the client restarted from seq {since}, below the previous incarnation's start "
                f"{before.start}; expected a saved position that never moves back",
                t,
            )
        )
    elif since > before.contiguous:
        result.violations.append(
            Violation(
                "lost_delivery",
                room,
                before.contiguous + 1,
                client,
                f"the client restarted from seq {since}, but its application was handed every message only "
                f"up to {before.contiguous}; {_span(before.contiguous + 1, since)} can never be delivered",
                t,
            )
        )


def _check_joined(client: str, event: Joined, store: StoreSnapshot, result: CheckResult) -> None:
    epoch = store.epochs.get(event.room)
    if event.reset:
        reason = "the server reset the client's position"
    elif epoch is not None and event.epoch != epoch:
        reason = f"the reply carried epoch {event.epoch!r} while the store's is {epoch!r}"
    else:
        return
    result.violations.append(
        Violation(
            "reset",
            event.room,
            event.since,
            client,
            f"{reason} in `joined` (since {event.since}, head {event.head}); expected the room's history to "
            "stay in one epoch",
            event.t,
        )
    )


def _check_delivery(
    client: str,
    event: Deliver,
    state: _Incarnation,
    before: _Incarnation | None,
    stored: _StoreIndex,
    result: CheckResult,
) -> None:
    room, seq = event.room, event.seq
    assert state.start is not None

    row = stored.at_seq.get((room, seq))
    if row is None:
        result.violations.append(
            Violation(
                "delivery_mismatch",
                room,
                seq,
                client,
                f"delivered message id {event.id!r} from {event.sender!r}, "
                "but the store has nothing at this seq",
                event.t,
            )
        )
    elif row.id != event.id or row.sender != event.sender:
        result.violations.append(
            Violation(
                "delivery_mismatch",
                room,
                seq,
                client,
                f"delivered message id {event.id!r} from {event.sender!r}; expected the stored id {row.id!r} "
                f"from {row.sender!r}",
                event.t,
            )
        )

    if seq <= state.start or seq in state.seen:
        origin = "the position it resumed from" if seq <= state.start else "an earlier delivery"
        result.violations.append(
            Violation(
                "duplicate_delivery",
                room,
                seq,
                client,
                f"the application was handed this seq again although it had it from {origin}; expected once",
                event.t,
            )
        )
        return

    if seq < state.highest:
        result.violations.append(
            Violation(
                "reordered_delivery",
                room,
                seq,
                client,
                f"handed after seq {state.highest}; expected seqs in ascending order",
                event.t,
            )
        )
    if before is not None and seq <= before.highest:
        result.redelivered_after_restart += 1

    state.seen.add(seq)
    state.highest = max(state.highest, seq)
    while state.contiguous + 1 in state.seen:
        state.contiguous += 1


def _report_holes(client: str, room: str, state: _Incarnation, result: CheckResult) -> None:
    if state.start is None:
        return
    missing = (seq for seq in range(state.start + 1, state.highest) if seq not in state.seen)
    for first, last in _ranges(missing):
        result.violations.append(
            Violation(
                "lost_delivery",
                room,
                first,
                client,
                f"{_span(first, last)} never reached the application, which was handed seqs up to "
                f"{state.highest} after starting at {state.start}",
            )
        )


def _check_complete(
    client: str, room: str, state: _Incarnation, store: StoreSnapshot, result: CheckResult
) -> None:
    head = store.heads.get(room, 0)
    if state.start is None or state.highest >= head:
        return
    result.violations.append(
        Violation(
            "lost_delivery",
            room,
            state.highest + 1,
            client,
            f"the client ended the run holding seqs up to {state.highest}, but the room's head is {head}; "
            f"expected every message up to the head after the final drain",
        )
    )


def _check_cursors(
    histories: Mapping[str, Sequence[Event]],
    store: StoreSnapshot,
    cursor_samples: Iterable[CursorSample],
    handed: dict[tuple[str, str], int],
    result: CheckResult,
) -> None:
    highest_acked: dict[tuple[str, str], tuple[int, float]] = {}
    for client in sorted(histories):
        for event in histories[client]:
            if not isinstance(event, Acked):
                continue
            result.acked += 1
            key = (client, event.room)
            earlier = highest_acked.get(key)
            if earlier is not None and event.seq < earlier[0]:
                result.violations.append(
                    Violation(
                        "cursor_backwards",
                        event.room,
                        event.seq,
                        client,
                        f"`acked` reported cursor {event.seq} after {earlier[0]} (at {earlier[1]:.3f}s); "
                        "expected a cursor that never moves back",
                        event.t,
                    )
                )
                continue
            highest_acked[key] = (event.seq, event.t)
            _check_not_ahead(key, event.seq, "`acked` reported", handed, event.t, result)

    last_sample: dict[tuple[str, str], tuple[int, float]] = {}
    for sample in sorted(cursor_samples, key=lambda sample: sample.t):
        if sample.cursor is None:
            continue
        key = (sample.user, sample.room)
        earlier = last_sample.get(key)
        if earlier is not None and sample.cursor < earlier[0]:
            result.violations.append(
                Violation(
                    "cursor_backwards",
                    sample.room,
                    sample.cursor,
                    sample.user,
                    f"the stored cursor read {sample.cursor} after it read {earlier[0]} at "
                    f"{earlier[1]:.3f}s; expected a cursor that never moves back",
                    sample.t,
                )
            )
        last_sample[key] = (sample.cursor, sample.t)
        if key in handed or key in highest_acked:
            _check_not_ahead(key, sample.cursor, "the stored cursor read", handed, sample.t, result)

    if store.cursors is None:
        return
    for key in sorted(highest_acked):
        user, room = key
        final = store.cursors.get(key)
        acked_seq, t = highest_acked[key]
        if final is None or final < acked_seq:
            result.violations.append(
                Violation(
                    "cursor_backwards",
                    room,
                    final,
                    user,
                    f"the stored cursor is {final} at the end, below the {acked_seq} that `acked` "
                    f"reported at {t:.3f}s; expected a cursor that never moves back",
                )
            )
    for key in sorted(handed):
        final = store.cursors.get(key)
        if final is not None:
            _check_not_ahead(key, final, "the final stored cursor is", handed, None, result)


def _check_not_ahead(
    key: tuple[str, str],
    cursor: int,
    source: str,
    handed: dict[tuple[str, str], int],
    t: float | None,
    result: CheckResult,
) -> None:
    user, room = key
    highest = handed.get(key, 0)
    if cursor > highest:
        result.violations.append(
            Violation(
                "cursor_ahead",
                room,
                cursor,
                user,
                f"{source} {cursor}, but the application was handed seqs only up to {highest}; expected a "
                "cursor no higher than what the application handled",
                t,
            )
        )


def _ranges(values: Iterable[int]) -> list[tuple[int, int]]:
    """Group ascending integers into (first, last) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] + 1 == value:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}..{last}"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
