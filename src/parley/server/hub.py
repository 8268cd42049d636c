"""The room hub: who follows each room, fan-out of committed messages, catch-up, presence and receipts.

Fan-out encodes a message once. A commit's new messages for one room become one byte string (their
frames back to back) for plain connections and one JSON array frame for connections that asked for
`batch`, and that same object is written to every subscriber. A room with more subscribers than
`shard_size` is written shard by shard, yielding to the event loop between shards.

A subscription takes a live message only when it directly follows what it was last sent and its
connection is not paused. Any other subscription is "catching up": its connection's catch-up task
reads what it misses from the hot cache or the store, in order, and turns it live again once it has
reached the room's head. So a slow consumer never makes the hub buffer for it, and no seq is ever skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from parley.cache.base import Entry, HotCache
from parley.protocol.delivery import DeliveryTracker, Follow, GiveUp, Resend
from parley.protocol.errors import CLOSE_ACK_TIMEOUT
from parley.protocol.frames import encode
from parley.protocol.model import Message
from parley.server.websocket import encode_frame
from parley.storage.base import Store

log = logging.getLogger("parley.hub")

CATCH_UP_PAGE = 500
CATCH_UP_CHUNK = 64 * 1024


class Peer(Protocol):
    """The part of a connection that the hub uses."""

    user: str
    session: str
    batch: bool
    paused: bool
    subscriptions: dict[str, Subscription]
    lagging: set[Subscription]
    catch_up_task: asyncio.Task[None] | None

    def write(self, data: bytes) -> None: ...

    def send_frame(self, frame: dict[str, Any]) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    @property
    def closing(self) -> bool: ...


class Subscription(Follow):
    """A connection following a room: its delivery position plus whether it takes live messages."""

    __slots__ = ("live", "peer")

    def __init__(self, room: str, position: int, peer: Peer) -> None:
        super().__init__(room, position)
        self.peer = peer
        self.live = False


class Room:
    """A room's head, epoch and subscribers on this node."""

    __slots__ = (
        "batched",
        "epoch",
        "fanout_queue",
        "fanout_task",
        "head",
        "marks",
        "merge_handle",
        "merge_pending",
        "name",
        "online",
        "plain",
        "receipt_handle",
        "receipts_pending",
    )

    def __init__(self, name: str, head: int, epoch: str | None = None) -> None:
        self.name = name
        self.head = head
        self.epoch = epoch
        self.plain: set[Subscription] = set()
        self.batched: set[Subscription] = set()
        self.fanout_queue: list[tuple[bool, list[Entry]]] = []
        self.fanout_task: asyncio.Task[None] | None = None
        self.merge_pending: list[Entry] = []
        self.merge_handle: asyncio.TimerHandle | None = None
        self.online: dict[str, int] = {}
        self.marks: dict[str, list[int]] = {}
        self.receipts_pending: set[str] = set()
        self.receipt_handle: asyncio.TimerHandle | None = None

    @property
    def subscriber_count(self) -> int:
        return len(self.plain) + len(self.batched)


class Hub:
    """Rooms of this node and the fan-out, catch-up and resend machinery around them."""

    def __init__(
        self,
        store: Store,
        cache: HotCache,
        tracker: DeliveryTracker,
        *,
        shard_size: int = 1000,
        batch_max: int = 256,
        batch_window: float = 0.005,
        presence_limit: int = 200,
        receipt_limit: int = 50,
        receipt_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache = cache
        self.tracker = tracker
        self.shard_size = shard_size
        self.batch_max = batch_max
        self.batch_window = batch_window
        self.presence_limit = presence_limit
        self.receipt_limit = receipt_limit
        self.receipt_interval = receipt_interval
        self.clock = clock
        self.rooms: dict[str, Room] = {}
        self.deliveries = 0
        self.resends = 0
        self.catch_ups = 0

    def room(self, name: str, head: int = 0, epoch: str | None = None) -> Room:
        """Return the room's state on this node, creating it with `head` and `epoch` if needed."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, head, epoch)
        else:
            room.head = max(room.head, head)
            if epoch is not None:
                room.epoch = epoch
        return room

    # Fan-out

    def on_commit(self, messages: Sequence[Message]) -> None:
        """Cache and fan out a commit's new messages; called by the store in seq order."""
        groups: dict[str, list[Entry]] = {}
        for message in messages:
            entry = Entry(message, message.encode())
            self.cache.add(entry)
            groups.setdefault(message.room, []).append(entry)

        for name, entries in groups.items():
            room = self.room(name)
            room.head = max(room.head, entries[-1].message.seq)
            if room.plain:
                self._fan_out(room, False, entries)
            if room.batched:
                self._queue_merged(room, entries)

    def _queue_merged(self, room: Room, entries: list[Entry]) -> None:
        """Hold messages for `batch` connections until the window closes or the batch is full."""
        room.merge_pending.extend(entries)
        if len(room.merge_pending) >= self.batch_max:
            self._flush_merged(room)
        elif room.merge_handle is None:
            room.merge_handle = asyncio.get_running_loop().call_later(
                self.batch_window, self._flush_merged, room
            )

    def _flush_merged(self, room: Room) -> None:
        if room.merge_handle is not None:
            room.merge_handle.cancel()
            room.merge_handle = None
        entries, room.merge_pending = room.merge_pending, []
        if entries:
            self._fan_out(room, True, entries)

    def _fan_out(self, room: Room, merged: bool, entries: list[Entry]) -> None:
        """Write entries to one kind of subscriber now, or through the room's sharded fan-out task."""
        subscriptions = room.batched if merged else room.plain
        if room.fanout_task is None and len(subscriptions) <= self.shard_size:
            self._write_live(entries, subscriptions, merged)
            return
        room.fanout_queue.append((merged, entries))
        if room.fanout_task is None:
            room.fanout_task = asyncio.get_running_loop().create_task(self._fan_out_sharded(room))

    async def _fan_out_sharded(self, room: Room) -> None:
        try:
            while room.fanout_queue:
                merged, entries = room.fanout_queue.pop(0)
                subscriptions = list(room.batched if merged else room.plain)
                for start in range(0, len(subscriptions), self.shard_size):
                    self._write_live(entries, subscriptions[start : start + self.shard_size], merged)
                    await asyncio.sleep(0)
        except Exception:
            log.exception("fan-out failed", extra={"room": room.name})
        finally:
            room.fanout_task = None

    def _write_live(self, entries: list[Entry], subscriptions: Iterable[Subscription], merged: bool) -> None:
        first = entries[0].message.seq
        last = entries[-1].message.seq
        if merged:
            data = encode_frame(b"[" + b",".join([entry.frame for entry in entries]) + b"]")
        else:
            data = b"".join([encode_frame(entry.frame) for entry in entries])
        self._write_to(subscriptions, data, first, last, self.clock())

    def _write_to(
        self, subscriptions: Iterable[Subscription], data: bytes, first: int, last: int, now: float
    ) -> None:
        expected = first - 1
        on_sent = self.tracker.on_sent
        written = 0
        for subscription in subscriptions:
            if subscription.live and subscription.sent == expected:
                peer = subscription.peer
                if peer.paused:
                    self._start_catch_up(subscription)
                    continue
                peer.write(data)
                if subscription.slot is None:
                    on_sent(subscription, last, now)
                else:
                    subscription.sent = last
                written += 1
            elif subscription.sent < expected:
                self._start_catch_up(subscription)
        self.deliveries += written * (last - first + 1)

    # Subscriptions

    def subscribe(self, peer: Peer, room: Room, since: int) -> Subscription:
        """Follow `room` on `peer` from position `since`, replacing an earlier subscription."""
        previous = peer.subscriptions.get(room.name)
        if previous is not None:
            self._drop(previous)
        subscription = Subscription(room.name, since, peer)
        peer.subscriptions[room.name] = subscription
        (room.batched if peer.batch else room.plain).add(subscription)
        self._set_online(room, peer.user, +1)
        if since >= room.head:
            subscription.live = True
        else:
            self._start_catch_up(subscription)
        return subscription

    def unsubscribe(self, peer: Peer, room_name: str) -> None:
        subscription = peer.subscriptions.pop(room_name, None)
        if subscription is not None:
            self._drop(subscription)
            room = self.rooms.get(room_name)
            if room is not None:
                self._set_online(room, peer.user, -1)

    def disconnect(self, peer: Peer) -> None:
        """Forget every subscription of a closed connection."""
        for name in list(peer.subscriptions):
            self.unsubscribe(peer, name)
        peer.lagging.clear()
        if peer.catch_up_task is not None:
            peer.catch_up_task.cancel()
            peer.catch_up_task = None

    def _drop(self, subscription: Subscription) -> None:
        self.tracker.forget(subscription)
        subscription.live = False
        subscription.peer.lagging.discard(subscription)
        room = self.rooms.get(subscription.room)
        if room is not None:
            room.plain.discard(subscription)
            room.batched.discard(subscription)

    # Catch-up and resend

    def _start_catch_up(self, subscription: Subscription) -> None:
        subscription.live = False
        peer = subscription.peer
        peer.lagging.add(subscription)
        if peer.catch_up_task is None and not peer.paused and not peer.closing:
            peer.catch_up_task = asyncio.get_running_loop().create_task(self._catch_up(peer))

    def resume_peer(self, peer: Peer) -> None:
        """Continue catching up a connection whose write buffer drained."""
        if peer.lagging and peer.catch_up_task is None and not peer.closing:
            peer.catch_up_task = asyncio.get_running_loop().create_task(self._catch_up(peer))

    async def _catch_up(self, peer: Peer) -> None:
        self.catch_ups += 1
        try:
            while peer.lagging and not peer.paused and not peer.closing:
                subscription = next(iter(peer.lagging))
                room = self.rooms[subscription.room]
                if subscription.sent >= room.head:
                    subscription.live = True
                    peer.lagging.discard(subscription)
                    continue
                entries = await self.read_after(room, subscription.sent, CATCH_UP_PAGE)
                if peer.subscriptions.get(room.name) is not subscription:
                    peer.lagging.discard(subscription)
                    continue
                if not entries:
                    log.error(
                        "catch-up read nothing after seq %d below head %d",
                        subscription.sent,
                        room.head,
                        extra={"session": peer.session, "user": peer.user, "room": room.name},
                    )
                    peer.lagging.discard(subscription)
                    continue
                self._write_catch_up(subscription, entries)
        except Exception:
            log.exception("catch-up failed", extra={"session": peer.session, "user": peer.user})
        finally:
            peer.catch_up_task = None

    def _write_catch_up(self, subscription: Subscription, entries: list[Entry]) -> None:
        """Write entries in chunks of at most `batch_max` messages or CATCH_UP_CHUNK bytes.

        Writing stops once the connection's buffer is full, so a page of large messages never queues far
        beyond the high-water mark. The catch-up loop goes on when the buffer drains.
        """
        entries = [entry for entry in entries if entry.message.seq > subscription.sent]
        if not entries or entries[0].message.seq != subscription.sent + 1:
            return
        peer = subscription.peer
        start = 0
        while start < len(entries) and not peer.paused and not peer.closing:
            end = start
            size = 0
            while end < len(entries) and end - start < self.batch_max and size < CATCH_UP_CHUNK:
                size += len(entries[end].frame)
                end += 1
            chunk = entries[start:end]
            if peer.batch:
                peer.write(encode_frame(b"[" + b",".join([entry.frame for entry in chunk]) + b"]"))
            else:
                peer.write(b"".join([encode_frame(entry.frame) for entry in chunk]))
            self.tracker.on_sent(subscription, chunk[-1].message.seq, self.clock())
            self.deliveries += len(chunk)
            start = end

    async def read_after(self, room: Room, after: int, limit: int) -> list[Entry]:
        """Read up to `limit` messages after `after` from the hot cache, or from the store on a miss."""
        cached = self.cache.read_after(room.name, after, limit, room.head)
        if cached is not None:
            return cached
        messages = await self.store.read_after(room.name, after, limit)
        return [Entry(message, message.encode()) for message in messages]

    async def read_before(self, room: Room, before: int, limit: int) -> list[Entry]:
        """Read the `limit` messages below `before` from the hot cache, or from the store on a miss."""
        cached = self.cache.read_before(room.name, before, limit)
        if cached is not None:
            return cached
        messages = await self.store.read_before(room.name, before, limit)
        return [Entry(message, message.encode()) for message in messages]

    def tick(self, now: float) -> None:
        """Run the resend wheel: resend what stays unacknowledged, close connections that gave up."""
        for action in self.tracker.poll(now):
            subscription = action.follow
            assert isinstance(subscription, Subscription)
            peer = subscription.peer
            if isinstance(action, GiveUp):
                log.info(
                    "closing after unacknowledged resends",
                    extra={
                        "session": peer.session,
                        "user": peer.user,
                        "room": subscription.room,
                        "seq": subscription.acked + 1,
                    },
                )
                peer.close(CLOSE_ACK_TIMEOUT, "acknowledgement timeout")
            elif isinstance(action, Resend):
                self.resends += 1
                log.debug(
                    "resending %d..%d",
                    action.first,
                    action.last,
                    extra={"session": peer.session, "user": peer.user, "room": subscription.room},
                )
                self.tracker.rewind(subscription, subscription.acked)
                self._start_catch_up(subscription)

    # Presence and receipts

    def _set_online(self, room: Room, user: str, change: int) -> None:
        before = room.online.get(user, 0)
        after = before + change
        if after > 0:
            room.online[user] = after
        else:
            room.online.pop(user, None)
        if (before == 0) != (after <= 0) and room.subscriber_count <= self.presence_limit:
            self.broadcast(room, {"type": "presence", "room": room.name, "user": user, "online": after > 0})

    def online_users(self, room: Room) -> list[str] | None:
        """List who is online in a room small enough for presence, else None."""
        if room.subscriber_count > self.presence_limit:
            return None
        return sorted(room.online)

    def broadcast(self, room: Room, *frames: dict[str, Any]) -> None:
        """Write control frames (presence, receipts) to every subscriber of the room in one write each.

        Plain connections get the frames back to back, `batch` connections one array frame.
        """
        encoded = [encode(frame) for frame in frames]
        plain = b"".join([encode_frame(item) for item in encoded])
        merged = encode_frame(b"[" + b",".join(encoded) + b"]") if len(encoded) > 1 else plain
        for subscriptions, data in ((room.plain, plain), (room.batched, merged)):
            for subscription in subscriptions:
                if not subscription.peer.paused:
                    subscription.peer.write(data)

    def on_marks(self, room_name: str, user: str, delivered: int | None, read: int | None) -> None:
        """Record a member's stored cursor or read marker and schedule a throttled receipt."""
        room = self.rooms.get(room_name)
        if room is None or room.subscriber_count > self.receipt_limit:
            return
        marks = room.marks.setdefault(user, [0, 0])
        if delivered is not None:
            marks[0] = max(marks[0], delivered)
        if read is not None:
            marks[1] = max(marks[1], read)
        room.receipts_pending.add(user)
        if room.receipt_handle is None:
            loop = asyncio.get_running_loop()
            room.receipt_handle = loop.call_later(self.receipt_interval, self._flush_receipts, room)

    def _flush_receipts(self, room: Room) -> None:
        room.receipt_handle = None
        pending, room.receipts_pending = room.receipts_pending, set()
        receipts = [
            {"type": "receipt", "room": room.name, "user": user, "delivered": marks[0], "read": marks[1]}
            for user in sorted(pending)
            for marks in (room.marks[user],)
        ]
        if receipts:
            self.broadcast(room, *receipts)
