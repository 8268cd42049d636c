"""The protocol of one WebSocket session: hello, rooms, sends, acks, history.

Frames are handled in the order they arrive. Handlers that only submit work to the store (send, ack,
read) return at once and reply from the store's completion callback, so a client can pipeline sends
and they are stored in arrival order. Handlers that must finish before the next frame (hello, join,
leave, history) return a coroutine, and the session's worker task awaits it before going on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from parley.protocol import errors
from parley.protocol.errors import CloseConnection, FrameError
from parley.protocol.frames import Ack, ClientFrame, Hello, History, Join, Leave, Ping, Read, Send
from parley.protocol.model import AppendResult
from parley.server.auth import AuthError
from parley.server.connection import HOLD_INBOX, HOLD_RATE
from parley.server.ratelimit import TokenBucket
from parley.server.websocket import encode_frame
from parley.storage.base import NotMemberError

if TYPE_CHECKING:
    from parley.server.app import App
    from parley.server.connection import Connection
    from parley.server.hub import Room

log = logging.getLogger("parley.session")

ERROR_WINDOW = 10.0
MAX_ERRORS_IN_WINDOW = 20
# Frames queued behind one that waits (a join, a history read) before the connection stops reading.
MAX_INBOX = 256
Handler = Callable[["Session", Any], Coroutine[Any, Any, None] | None]


class Session:
    """Frame handling for one connection, from `hello` to close."""

    __slots__ = ("app", "connection", "errors", "frame_bucket", "inbox", "send_bucket", "user", "worker")

    def __init__(self, app: App, connection: Connection) -> None:
        self.app = app
        self.connection = connection
        self.user: str | None = None
        # Plain lists, not deques: an idle session should cost as little memory as possible.
        self.inbox: list[ClientFrame | FrameError] = []
        self.worker: asyncio.Task[None] | None = None
        self.errors: list[float] = []
        self.send_bucket = TokenBucket(app.settings.send_rate, app.settings.send_burst)
        self.frame_bucket = TokenBucket(app.settings.frame_rate, app.settings.frame_burst)

    @property
    def ids(self) -> dict[str, Any]:
        return {"session": self.connection.session, "user": self.user}

    # Input

    def on_text(self, payload: bytes) -> None:
        items = self.app.parser.parse_message(payload)
        if self.user is None and self.worker is None and not self.inbox:
            items = self._expect_hello(items)
        self._charge_frames(len(items))
        self.inbox.extend(items)
        if len(self.inbox) >= MAX_INBOX:
            self.connection.hold_reading(HOLD_INBOX)
        if self.worker is None:
            self._drain_inline()

    def _charge_frames(self, count: int) -> None:
        """Count frames against the connection's budget; past it, stop reading until the budget refills.

        Frames already received are still handled, so nothing is lost: a flood only slows its sender.
        """
        wait = self.frame_bucket.charge(time.monotonic(), count)
        if wait > 0:
            connection = self.connection
            connection.hold_reading(HOLD_RATE)
            asyncio.get_running_loop().call_later(wait, connection.release_reading, HOLD_RATE)

    def _expect_hello(self, items: list[ClientFrame | FrameError]) -> list[ClientFrame | FrameError]:
        """Check that a session's first frame is a hello; a hello with an invalid field may be retried."""
        while items:
            first = items[0]
            if not isinstance(first, FrameError) or (first.ref or {}).get("type") != "hello":
                break
            self.reject(first)
            items.pop(0)
        if items and not isinstance(items[0], Hello):
            raise CloseConnection(errors.CLOSE_POLICY, "the first frame must be hello")
        return items

    def on_binary(self, size: int) -> None:
        if self.user is None and self.worker is None and not self.inbox:
            raise CloseConnection(errors.CLOSE_POLICY, "the first frame must be hello")
        self.reject(FrameError(errors.BAD_FRAME, "binary messages are not accepted; send JSON text"))

    def on_closed(self) -> None:
        self.app.hub.disconnect(self.connection)
        self.app.forget_user_connection(self.connection)
        if self.worker is not None:
            self.worker.cancel()
            self.worker = None

    def _drain_inline(self) -> None:
        """Handle queued frames now, until one needs to wait; hand the rest to a worker task.

        While the client's write buffer is full, frames wait too: replies to a client that does not read
        must not pile up in memory.
        """
        while self.inbox and not self.connection.closing:
            if self.connection.paused:
                self.worker = asyncio.get_running_loop().create_task(self._work(None))
                return
            item = self.inbox.pop(0)
            pending = self._dispatch(item)
            if pending is not None:
                self.worker = asyncio.get_running_loop().create_task(self._work(pending))
                return
        self.connection.release_reading(HOLD_INBOX)

    async def _work(self, pending: Awaitable[None] | None) -> None:
        connection = self.connection
        try:
            if pending is not None:
                await self._guard(pending)
            while self.inbox and not connection.closing:
                if connection.paused:
                    await connection.writable()
                    continue
                item = self.inbox.pop(0)
                if len(self.inbox) < MAX_INBOX // 2:
                    connection.release_reading(HOLD_INBOX)
                step = self._dispatch(item)
                if step is not None:
                    await self._guard(step)
            connection.release_reading(HOLD_INBOX)
        finally:
            self.worker = None

    async def _guard(self, step: Awaitable[None]) -> None:
        try:
            await step
        except FrameError as error:
            self.reject(error)
        except CloseConnection as close:
            self.connection.close(close.code, close.reason)
        except Exception as error:
            log.exception("handler failed", extra=self.ids)
            self.reject(FrameError(errors.INTERNAL, f"internal error ({type(error).__name__})"))

    def _dispatch(self, item: ClientFrame | FrameError) -> Coroutine[Any, Any, None] | None:
        if isinstance(item, FrameError):
            self.reject(item)
            return None
        if isinstance(item, Hello) and self.user is None:
            return self.on_hello(item)
        try:
            return HANDLERS[type(item)](self, item)
        except FrameError as error:
            self.reject(error)
        return None

    # Output

    def reply(self, frame: dict[str, Any]) -> None:
        self.connection.send_frame(frame)

    def reject(self, error: FrameError) -> None:
        """Send an error frame; close with 1008 after too many errors in a short time."""
        log.info("rejected frame: %s", error, extra={**self.ids, "ref": error.ref})
        self.reply(error.to_frame())
        if error.code == errors.RATE_LIMITED:
            return  # a well-behaved client that sends a burst is slowed down, not disconnected
        now = time.monotonic()
        self.errors = [stamp for stamp in self.errors if stamp >= now - ERROR_WINDOW]
        self.errors.append(now)
        if len(self.errors) > MAX_ERRORS_IN_WINDOW:
            log.info("closing after repeated errors", extra=self.ids)
            self.connection.close(errors.CLOSE_POLICY, "too many errors")

    # Hello and resume

    async def on_hello(self, hello: Hello) -> None:
        connection = self.connection
        try:
            user = self.app.auth.authenticate(hello.token or connection.token, hello.user)
        except AuthError as error:
            log.info("authentication failed: %s", error, extra=self.ids)
            self.reply({"type": "error", "code": errors.UNAUTHORIZED, "message": str(error)})
            connection.close(errors.CLOSE_UNAUTHORIZED, "unauthorized")
            return

        connection.set_deadline(None)
        self.user = connection.user = user
        connection.batch = hello.batch
        self.app.remember_user_connection(connection)
        settings = self.app.settings
        limits = self.app.limits
        self.reply(
            {
                "type": "welcome",
                "protocol": 1,
                "user": user,
                "session": connection.session,
                "heartbeat": int(settings.heartbeat * 1000),
                "ack_timeout": int(settings.ack_timeout * 1000),
                "max_body": limits.max_body,
                "max_meta": limits.max_meta,
                "max_frame": limits.max_frame,
            }
        )
        device = repr(hello.device) if hello.device is not None else None
        log.info("connected", extra={**self.ids, "peer": connection.peer_address, "device": device})

        try:
            await self.resume(user, hello.resume)
        except Exception:
            # A session that missed part of its resume would wait for messages that never come.
            log.exception("resuming rooms failed; closing so the client reconnects", extra=self.ids)
            connection.close(errors.CLOSE_INTERNAL, "resume failed")

    async def resume(self, user: str, positions: dict[str, tuple[int, str | None]]) -> None:
        """Follow every room the user is a member of, from the client's position or the stored cursor."""
        connection = self.connection
        for membership in await self.app.store.memberships(user):
            self.app.cursors.load(user, membership.room, membership.cursor)
            info = await self.app.store.room_info(membership.room)
            if info is None or connection.closing:
                continue
            room = self.app.hub.room(info.room, info.head, info.epoch)
            position = positions.get(room.name)
            since, epoch = position if position is not None else (membership.cursor, None)
            self.follow(room, since, epoch, None)

    async def on_hello_again(self, hello: Hello) -> None:
        raise FrameError(
            errors.INVALID_FIELD, "hello: already received on this connection", {"type": "hello"}
        )

    def follow(self, room: Room, since: int | None, epoch: str | None, last: int | None) -> int:
        """Reply `joined` and subscribe from the resolved position; return that position."""
        head = room.head
        reset = False
        if since is not None and ((epoch is not None and epoch != room.epoch) or since > head):
            reset = True
            since = None
            log.info("position outside the room's epoch, resetting", extra={**self.ids, "room": room.name})
        if since is None and last is not None:
            since = max(0, head - last)
        elif since is None:
            since = 0 if reset else head

        joined: dict[str, Any] = {
            "type": "joined",
            "room": room.name,
            "epoch": room.epoch,
            "head": head,
            "since": since,
        }
        if reset:
            joined["reset"] = True
        if room.subscriber_count >= self.app.settings.large_room:
            joined["ack_interval"] = int(self.app.settings.large_room_ack_interval * 1000)
        online = self.app.hub.online_users(room)
        if online is not None:
            joined["online"] = sorted({*online, self.connection.user})
        self.reply(joined)
        self.app.hub.subscribe(self.connection, room, since)
        return since

    # Rooms

    async def on_join(self, frame: Join) -> None:
        user = self.require_user()
        if not self.app.may_join(user, frame.room):
            raise FrameError(
                errors.FORBIDDEN, f"room {frame.room}: private", {"type": "join", "room": frame.room}
            )

        info, membership, _was_member = await self.app.store.join(user, frame.room)
        room = self.app.hub.room(info.room, info.head, info.epoch)
        since, epoch = frame.since, frame.epoch
        if since is None and membership.cursor is not None:
            since, epoch = membership.cursor, None
        position = self.follow(room, since, epoch, frame.last)
        if membership.cursor is None:
            stored = await self.app.store.set_cursor_if_unset(user, room.name, position)
            self.app.cursors.load(user, room.name, stored)
        else:
            self.app.cursors.load(user, room.name, membership.cursor)
        log.info("joined", extra={**self.ids, "room": room.name, "seq": position})

    async def on_leave(self, frame: Leave) -> None:
        user = self.require_user()
        await self.app.store.leave(user, frame.room)
        self.app.cursors.forget(user, frame.room)
        for connection in self.app.user_connections(user):
            self.app.hub.unsubscribe(connection, frame.room)
            connection.send_frame({"type": "left", "room": frame.room})
        log.info("left", extra={**self.ids, "room": frame.room})

    # Messages

    def on_send(self, frame: Send) -> Coroutine[Any, Any, None] | None:
        user = self.require_user()
        ref = {"type": "send", "room": frame.room, "id": frame.id}
        wait = self.send_bucket.take(time.monotonic())
        if wait > 0:
            raise FrameError(errors.RATE_LIMITED, "sending too fast", ref, retry_after=int(wait * 1000) + 1)
        if frame.room in self.connection.subscriptions:
            self.submit_send(user, frame, ref)
            return None
        return self.send_after_member_check(user, frame, ref)

    async def send_after_member_check(self, user: str, frame: Send, ref: dict[str, Any]) -> None:
        await self.require_member(user, frame.room, ref)
        self.submit_send(user, frame, ref)

    def submit_send(self, user: str, frame: Send, ref: dict[str, Any]) -> None:
        ts = int(time.time() * 1000)
        future = asyncio.ensure_future(
            self.app.store.append(frame.room, user, frame.id, frame.body, frame.meta, ts)
        )
        future.add_done_callback(lambda done: self.on_stored(done, ref))

    def on_stored(self, done: asyncio.Future[AppendResult], ref: dict[str, Any]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            log.error(
                "storing a message failed: %s",
                error,
                extra={**self.ids, "room": ref["room"], "id": ref["id"]},
            )
            self.reply(
                {
                    "type": "error",
                    "code": errors.INTERNAL,
                    "message": "storing the message failed",
                    "ref": ref,
                }
            )
            return
        result = done.result()
        message = result.message
        if result.conflict:
            self.reject(
                FrameError(
                    errors.ID_CONFLICT,
                    f"id {message.id} is already stored as seq {message.seq} with another body or meta",
                    ref,
                )
            )
            return
        sent: dict[str, Any] = {
            "type": "sent",
            "room": message.room,
            "id": message.id,
            "seq": message.seq,
            "ts": message.ts,
        }
        if result.dup:
            sent["dup"] = True
        self.reply(sent)

    # Acknowledgements

    def on_ack(self, frame: Ack) -> Coroutine[Any, Any, None] | None:
        user = self.require_user()
        subscription = self.connection.subscriptions.get(frame.room)
        if subscription is None:
            return self.ack_after_member_check(user, frame)
        room = self.app.hub.room(frame.room)
        if frame.seq > room.head:
            raise FrameError(
                errors.INVALID_FIELD,
                f"seq: {frame.seq} is beyond the room's head {room.head}",
                {"type": "ack", "room": frame.room},
            )
        self.app.hub.tracker.on_ack(subscription, frame.seq, time.monotonic())
        self.submit_cursor(user, frame.room, frame.seq)
        return None

    async def ack_after_member_check(self, user: str, frame: Ack) -> None:
        await self.require_member(user, frame.room, {"type": "ack", "room": frame.room})
        info = await self.app.store.room_info(frame.room)
        if info is None or frame.seq > info.head:
            raise FrameError(
                errors.INVALID_FIELD, "seq: beyond the room's head", {"type": "ack", "room": frame.room}
            )
        self.submit_cursor(user, frame.room, frame.seq)

    def submit_cursor(self, user: str, room: str, seq: int) -> None:
        ref = {"type": "ack", "room": room}

        def on_stored(stored: int | None, error: BaseException | None) -> None:
            if isinstance(error, NotMemberError):
                self.reject(FrameError(errors.NOT_JOINED, f"room {room}: not a member", ref))
            elif error is not None or stored is None:
                log.error("storing a cursor failed: %s", error, extra={**self.ids, "room": room, "seq": seq})
                self.reply(
                    {
                        "type": "error",
                        "code": errors.INTERNAL,
                        "message": "storing the ack failed",
                        "ref": ref,
                    }
                )
            else:
                self.reply(self.acked_frame(room, stored))

        self.app.cursors.advance(user, room, seq, on_stored)

    def acked_frame(self, room_name: str, stored: int) -> dict[str, Any]:
        """Build `acked`, asking for slower acks once the room has grown large."""
        frame: dict[str, Any] = {"type": "acked", "room": room_name, "seq": stored}
        room = self.app.hub.rooms.get(room_name)
        if room is not None and room.subscriber_count >= self.app.settings.large_room:
            frame["ack_interval"] = int(self.app.settings.large_room_ack_interval * 1000)
        return frame

    def on_read(self, frame: Read) -> Coroutine[Any, Any, None] | None:
        user = self.require_user()
        if frame.room not in self.connection.subscriptions:
            return self.read_after_member_check(user, frame)
        self.submit_read(user, frame.room, frame.seq)
        return None

    async def read_after_member_check(self, user: str, frame: Read) -> None:
        await self.require_member(user, frame.room, {"type": "read", "room": frame.room})
        self.submit_read(user, frame.room, frame.seq)

    async def require_member(self, user: str, room: str, ref: dict[str, Any]) -> None:
        """Raise not_joined unless the user is a member of `room`, which this connection does not follow."""
        if not await self.app.store.is_member(user, room):
            raise FrameError(errors.NOT_JOINED, f"room {room}: not a member; join it first", ref)

    def submit_read(self, user: str, room: str, seq: int) -> None:
        future = asyncio.ensure_future(
            self.app.store.advance_read(user, room, min(seq, self.app.hub.room(room).head))
        )

        def on_done(done: asyncio.Future[int]) -> None:
            if done.cancelled():
                return
            if done.exception() is not None:
                log.error(
                    "storing a read marker failed: %s", done.exception(), extra={**self.ids, "room": room}
                )
                return
            self.app.hub.on_marks(room, user, None, done.result())

        future.add_done_callback(on_done)

    # History and liveness

    async def on_history(self, frame: History) -> None:
        user = self.require_user()
        ref = {"type": "history", "room": frame.room, **({"id": frame.id} if frame.id else {})}
        if not self.app.may_join(user, frame.room):
            raise FrameError(errors.FORBIDDEN, f"room {frame.room}: private", ref)
        page, more = await self.app.read_history(frame.room, frame.before, frame.after, frame.limit)
        reply: dict[str, Any] = {"type": "history", "room": frame.room, "messages": page, "more": more}
        if frame.id is not None:
            reply["id"] = frame.id
        self.connection.write(encode_frame(orjson.dumps(reply)))

    def on_ping(self, frame: Ping) -> None:
        self.reply({"type": "pong"})

    def require_user(self) -> str:
        if self.user is None:
            raise CloseConnection(errors.CLOSE_POLICY, "the first frame must be hello")
        return self.user


HANDLERS: dict[type, Handler] = {
    Hello: Session.on_hello_again,
    Join: Session.on_join,
    Leave: Session.on_leave,
    Send: Session.on_send,
    Ack: Session.on_ack,
    Read: Session.on_read,
    History: Session.on_history,
    Ping: Session.on_ping,
}
