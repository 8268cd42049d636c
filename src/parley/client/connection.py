"""The asyncio Parley client: reliable sends, in-order delivery without duplicates, and resume.

The Client is a pump around two sans-IO state machines. The Outbox keeps every unconfirmed `send` and
returns the ones due for transmission. The Receiver keeps each room's position, drops duplicates, detects
gaps and coalesces acks. The Client moves frames between them and the Transport (which connects, reconnects
with backoff and writes frames in queue order), and its timer task sleeps until their next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from parley.client.errors import (
    ClientClosed,
    ClientError,
    RequestFailed,
    SendFailed,
    StateFileError,
    Unauthorized,
)
from parley.client.positions import StateFile, restore, snapshot
from parley.client.requests import PendingRequests
from parley.client.results import ClientStatistics, HistoryPage, Sent
from parley.client.stream import MessageStream
from parley.client.transport import Transport
from parley.client.validation import check_client_arguments, check_last, check_message, check_name
from parley.protocol.model import Message
from parley.protocol.outbox import Outbox
from parley.protocol.receiver import (
    Deliver,
    Duplicate,
    Gap,
    Joined,
    MalformedFrame,
    NotFollowed,
    Receiver,
    message_from_frame,
)

log = logging.getLogger("parley.client")

RESEND_BACKOFF_CAP = 60.0
STATE_SAVE_INTERVAL = 0.2
CLOSE_FLUSH_TIMEOUT = 2.0


class Client:
    """A Parley client with reliable sends and in-order, duplicate-free delivery across reconnects.

    `user` is for servers with open authentication, `token` is sent as `Authorization: Bearer`.
    `state_file` keeps handled positions and unconfirmed sends between runs of the program.
    `ack_interval` is the minimum time in seconds between two acks of one room, and `send_timeout` the
    wait in seconds for `sent` before a resend. `backoff_base` and `backoff_cap` bound the random wait in
    seconds before a reconnect (full jitter, doubling after each failed attempt).

    Limits: the outbox and the queue of delivered messages have no size limit. A message counts as
    handled only once the application moves past it, so an application that stops reading messages
    stops acknowledging, and the server eventually closes the connection with 4008 and the client
    reconnects and resumes.
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        token: str | None = None,
        device: str | None = None,
        batch: bool = False,
        state_file: str | Path | None = None,
        ack_interval: float = 0.1,
        send_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        open_timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        check_client_arguments(url, user, token, backoff_base, backoff_cap, open_timeout)

        self.url = url
        self.user = user
        self._token = token
        self._device = device
        self._batch = batch

        self._outbox = Outbox(send_timeout=send_timeout, backoff_cap=max(RESEND_BACKOFF_CAP, send_timeout))
        self._receiver = Receiver(ack_interval=ack_interval)
        self._state_file = StateFile(state_file) if state_file is not None else None
        self._account: str | None = user
        self._load_state()

        self._transport = Transport(
            url,
            _TransportListener(self),
            token=token,
            batch=batch,
            open_timeout=open_timeout,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            rng=rng if rng is not None else random.Random(),
        )
        self._connected = False
        self._session: str | None = None
        self._max_body: int | None = None
        self._closing = False
        self._shut_down = False
        self._fatal: ClientError | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._first_welcome: asyncio.Future[None] | None = None

        self._inbox: deque[tuple[Message, int]] = deque()
        self._inbox_ready = asyncio.Event()
        self._delivered_generation: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._outbox_changed = asyncio.Event()
        self._state_dirty = False
        self._last_save = -math.inf

        self._requests = PendingRequests()
        self._history_counter = 0

        self._connections = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "welcome": self._on_welcome,
            "joined": self._on_joined,
            "msg": self._on_msg,
            "sent": self._on_sent,
            "acked": self._on_acked,
            "left": self._on_left,
            "history": self._on_history,
            "error": self._on_error,
        }

    # Public API

    async def connect(self) -> None:
        """Start the background connection and wait for the first `welcome`.

        Keeps retrying while the server is unreachable; wrap the call in `asyncio.timeout` to bound the
        wait. Raises Unauthorized when the server rejects the credentials, ClientClosed after `close()`.
        """
        self._check_open()
        if self._timer_task is None:
            self._first_welcome = asyncio.get_running_loop().create_future()
            self._timer_task = asyncio.create_task(self._timer_loop(), name="parley-client timer")
            self._transport.start()
        assert self._first_welcome is not None
        await asyncio.shield(self._first_welcome)

    async def join(self, room: str, last: int | None = None) -> Joined:
        """Join `room` and wait for `joined`; the room's messages then arrive through `messages()`.

        The client sends its held position when it has one. Otherwise `last` requests the N latest
        messages, which the server applies only when the user has no stored cursor for the room.
        Raises RequestFailed (for example with code `forbidden`).
        """
        self._check_open()
        check_name("room", room)
        check_last(last)

        future = self._requests.add_join(room, last)
        self._enqueue(self._join_frame(room))
        return await future

    async def leave(self, room: str) -> None:
        """Leave `room` (membership ends) and wait for `left`. Raises RequestFailed."""
        self._check_open()
        check_name("room", room)

        future = self._requests.add_leave(room)
        self._enqueue({"type": "leave", "room": room})
        await future

    def send_nowait(self, room: str, body: str, meta: dict[str, Any] | None = None) -> asyncio.Future[Sent]:
        """Queue a message and return a future for its `sent` confirmation.

        The message is transmitted at once when connected, otherwise after the next `welcome`, and again
        with the same id after a timeout or a reconnect until the server confirms it. Cancelling the
        future does not withdraw the message. Raises ValueError for a body or meta that the server would
        reject; the future fails with SendFailed when the server rejects the message.
        """
        self._check_open()
        check_message(room, body, meta, self._max_body)

        message_id = self._outbox.new_id()
        future = self._requests.add_send(room, message_id)
        entry = self._outbox.add(room, message_id, body, meta, self._now())
        if entry is not None:
            self._enqueue(entry.to_frame())

        self._mark_dirty()
        return future

    async def send(self, room: str, body: str, meta: dict[str, Any] | None = None) -> Sent:
        """Send a message and wait until the server has stored it. See `send_nowait`."""
        return await self.send_nowait(room, body, meta)

    async def wait_sent(self) -> None:
        """Wait until no send is pending, including sends restored from the state file.

        Raises the fatal error (such as Unauthorized) or ClientClosed when the client stops first.
        """
        while self._outbox.pending():
            self._check_open()
            self._outbox_changed.clear()
            await self._outbox_changed.wait()

    async def history(
        self, room: str, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> HistoryPage:
        """Read a page of a room's history without moving any cursor.

        `before=S` gives the `limit` highest seqs below S, `after=S` the lowest above S; with neither, the
        server's default applies. The server caps `limit` at 200. Raises RequestFailed.
        """
        self._check_open()
        check_name("room", room)
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")

        self._history_counter += 1
        request_id = f"h-{self._outbox.id_prefix}-{self._history_counter}"
        frame: dict[str, Any] = {"type": "history", "room": room, "limit": limit, "id": request_id}
        if before is not None:
            frame["before"] = before
        if after is not None:
            frame["after"] = after

        future = self._requests.add_history(request_id, frame)
        self._enqueue(frame)
        try:
            return await future
        finally:
            self._requests.forget_history(request_id)

    def messages(self) -> MessageStream:
        """Return an async iterator over delivered messages, in seq order per room, without duplicates.

        A message counts as handled, and is then acknowledged, when the consumer requests the next one or
        calls `handled(message)`. Use one consumer at a time. The iterator ends after `close()` and
        raises the fatal error (such as Unauthorized) when the client stopped for one.
        """
        return MessageStream(self)

    def handled(self, message: Message) -> None:
        """Mark `message` and every earlier message of its room as handled, to be acknowledged."""
        # NOTE: the generation is that of the room's latest message taken from the stream. A message taken
        # before a reset and marked after a newer one is therefore checked only against the room's `since`.
        generation = self._delivered_generation.get(message.room)
        if self._receiver.handled(message.room, message.seq, generation):
            self._mark_dirty()

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters."""
        outbox = self._outbox.statistics()
        receiver = self._receiver.statistics()
        return ClientStatistics(
            connections=self._connections,
            reconnects=max(self._connections - 1, 0),
            resends=outbox.resends,
            sends_confirmed=outbox.confirmed,
            sends_failed=outbox.failed,
            sends_pending=outbox.pending,
            delivered=receiver.delivered,
            duplicates=receiver.duplicates,
            gaps=receiver.gaps,
            resets=receiver.resets,
        )

    @property
    def connected(self) -> bool:
        """Whether a connection is open and welcomed."""
        return self._connected

    @property
    def session(self) -> str | None:
        """The server's session id of the current or last connection."""
        return self._session

    async def close(self) -> None:
        """Acknowledge what was handled, save the state file and close the connection with code 1000.

        Unconfirmed sends stay in the state file, if there is one, and go out again on the next run.
        Pending requests fail with ClientClosed.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self._closing = True

        await self._flush_acks()
        await self._transport.close()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task

        self._save_state(self._now())
        self._fail_waiters(self._fatal or ClientClosed())
        self._inbox_ready.set()
        self._outbox_changed.set()
        log.info("client closed", extra={"user": self._account, "session": self._session})

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Message stream support

    def _take_message(self) -> Message | None:
        """Pop the next delivered message, or return None when none is queued."""
        if not self._inbox:
            if self._fatal is not None:
                raise self._fatal
            return None
        message, generation = self._inbox.popleft()
        self._delivered_generation[message.room] = generation
        return message

    async def _wait_for_message(self) -> bool:
        """Wait until a message is queued; return False when the client is closed instead."""
        while not self._inbox:
            if self._fatal is not None:
                raise self._fatal
            if self._closing:
                return False
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        return True

    # Connection events, called by the transport

    def _on_connection_lost(self) -> None:
        self._connected = False
        self._outbox.on_disconnect()
        self._receiver.on_disconnect()

    def _stop(self, error: ClientError) -> None:
        """Stop for good after a fatal error: no reconnect, every waiter fails with `error`."""
        log.error("client stopped: %s", error, extra={"user": self._account})
        self._fatal = error
        self._closing = True
        self._fail_waiters(error)
        self._inbox_ready.set()
        self._outbox_changed.set()
        self._transport.stop()

    # Frames from the server

    def _handle_text(self, data: str) -> None:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            log.warning("invalid JSON from server ignored: %s", error, extra={"session": self._session})
            return

        frames = value if isinstance(value, list) else [value]
        for frame in frames:
            if not isinstance(frame, dict):
                log.warning("non-object frame from server ignored", extra={"session": self._session})
                continue
            handler = self._handlers.get(frame.get("type"))  # type: ignore[arg-type]
            if handler is None:
                continue
            try:
                handler(frame)
            except MalformedFrame as error:
                log.warning("%s; frame ignored", error, extra={"session": self._session})

    def _on_welcome(self, frame: dict[str, Any]) -> None:
        user = frame.get("user")
        if self._state_file is not None and self._account is not None and user != self._account:
            self._stop(StateFileError(self._state_file.path, f"belongs to {self._account!r}, not {user!r}"))
            return

        self._account = user if isinstance(user, str) else self._account
        self._session = frame.get("session") if isinstance(frame.get("session"), str) else None
        max_body = frame.get("max_body")
        self._max_body = max_body if isinstance(max_body, int) else None
        self._connected = True
        self._connections += 1
        log.info("connected to %s", self.url, extra={"user": self._account, "session": self._session})

        for room in self._requests.pending_joins():
            self._enqueue(self._join_frame(room))
        resent = self._outbox.on_reconnect(self._now())
        for entry in resent:
            self._enqueue(entry.to_frame())
        for room in self._requests.pending_leaves():
            self._enqueue({"type": "leave", "room": room})
        for request in self._requests.history_frames():
            self._enqueue(request)
        if resent:
            log.info("resending %d unconfirmed messages", len(resent), extra={"session": self._session})

        self._wake.set()
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_result(None)

    def _on_joined(self, frame: dict[str, Any]) -> None:
        joined = self._receiver.on_joined(frame)
        if joined.reset:
            self._drop_queued(joined.room)
            log.warning(
                "history of the room was reset by the server; restarting at seq %d",
                joined.since,
                extra={"room": joined.room, "session": self._session},
            )
        self._mark_dirty()
        self._requests.complete_join(joined)

    def _on_msg(self, frame: dict[str, Any]) -> None:
        outcome = self._receiver.on_msg(frame)
        match outcome:
            case Deliver(message=message, generation=generation):
                self._inbox.append((message, generation))
                self._inbox_ready.set()
            case Gap(
                room=room, expected=expected, received=received, position=position, request_join=request
            ):
                log.warning(
                    "gap: expected seq %d, received %d%s",
                    expected,
                    received,
                    "; joining again from the held position" if request else "",
                    extra={"room": room, "session": self._session},
                )
                if request:
                    self._enqueue({"type": "join", "room": room, **position.to_fields()})
            case Duplicate() | NotFollowed():
                pass

    def _on_sent(self, frame: dict[str, Any]) -> None:
        room, message_id, seq, ts = frame.get("room"), frame.get("id"), frame.get("seq"), frame.get("ts")
        if not (isinstance(room, str) and isinstance(message_id, str) and isinstance(seq, int)):
            raise MalformedFrame("sent", "room, id or seq")
        dup = frame.get("dup") is True

        if self._outbox.on_sent(room, message_id, seq, dup) is not None:
            self._mark_dirty()
            self._outbox_changed.set()
        self._requests.confirm_send(Sent(room, message_id, seq, ts if isinstance(ts, int) else 0, dup))

    def _on_acked(self, frame: dict[str, Any]) -> None:
        room, seq = frame.get("room"), frame.get("seq")
        if isinstance(room, str) and isinstance(seq, int):
            self._receiver.on_acked(room, seq, frame.get("ack_interval"))

    def _on_left(self, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        if not isinstance(room, str):
            raise MalformedFrame("left", "room")

        self._receiver.on_left(room)
        self._mark_dirty()
        self._requests.complete_leave(room)

    def _on_history(self, frame: dict[str, Any]) -> None:
        request_id = str(frame.get("id"))
        if not self._requests.has_history(request_id):
            return
        room = frame.get("room")
        entries = frame.get("messages")
        if not isinstance(room, str) or not isinstance(entries, list):
            raise MalformedFrame("history", "room or messages")

        messages = [message_from_frame(entry, room) for entry in entries]
        self._requests.complete_history(request_id, HistoryPage(room, messages, frame.get("more") is True))

    def _on_error(self, frame: dict[str, Any]) -> None:
        code = str(frame.get("code"))
        text = str(frame.get("message", ""))
        ref = frame.get("ref")
        if not isinstance(ref, dict):
            ref = {}
        kind, room, ref_id = ref.get("type"), ref.get("room"), ref.get("id")
        extra = {"room": room, "id": ref_id, "session": self._session, "error": code}

        if kind == "send" and isinstance(room, str) and isinstance(ref_id, str):
            self._on_send_error(room, ref_id, code, text, frame.get("retry_after"))
        elif kind == "join" and isinstance(room, str):
            self._requests.fail_join(room, RequestFailed("join", room, code, text))
        elif kind == "leave" and isinstance(room, str):
            self._requests.fail_leave(room, RequestFailed("leave", room, code, text))
        elif kind == "history" and isinstance(ref_id, str) and self._requests.has_history(ref_id):
            self._requests.fail_history(ref_id, RequestFailed("history", room, code, text))
        else:
            log.warning("error from server: %s: %s", code, text, extra=extra)

    def _on_send_error(self, room: str, message_id: str, code: str, text: str, retry_after: Any) -> None:
        seconds = retry_after / 1000 if isinstance(retry_after, int | float) else None
        failed = self._outbox.on_error(room, message_id, code, self._now(), seconds)
        extra = {"room": room, "id": message_id, "session": self._session, "error": code}
        if failed is None:
            log.info("send will be retried after %s", code, extra=extra)
            self._wake.set()
            return

        log.warning("send rejected, message dropped: %s: %s", code, text, extra=extra)
        self._mark_dirty()
        self._outbox_changed.set()
        self._requests.fail_send(room, message_id, SendFailed(room, message_id, code, text))

    # Timers: resends, acks, state file

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            now = self._now()
            try:
                self._run_timers(now)
            except Exception:
                log.exception("client timer failed; resends and acks continue at the next deadline")

            deadline = self._next_deadline()
            timeout = None if deadline is None else max(deadline - now, 0.001)
            # asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow a cancellation
            # that arrives as the event fires, and close() would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _run_timers(self, now: float) -> None:
        acks: list[tuple[str, int]] = []
        if self._connected:
            resent = self._outbox.due(now)
            for entry in resent:
                self._enqueue(entry.to_frame())
            if resent:
                log.info(
                    "resending %d unconfirmed messages after timeout",
                    len(resent),
                    extra={"session": self._session},
                )
            acks = self._receiver.acks_due(now)

        # The file must hold at least what the server stores as the cursor, so it is saved before acks.
        if self._state_dirty and (acks or now >= self._last_save + STATE_SAVE_INTERVAL):
            self._save_state(now)
        for room, seq in acks:
            self._enqueue({"type": "ack", "room": room, "seq": seq})

    def _next_deadline(self) -> float | None:
        deadlines = [self._outbox.next_deadline()]
        if self._connected:
            deadlines.append(self._receiver.next_ack_deadline())
        if self._state_dirty:
            deadlines.append(self._last_save + STATE_SAVE_INTERVAL)
        return min((deadline for deadline in deadlines if deadline is not None), default=None)

    async def _flush_acks(self) -> None:
        if not self._connected:
            return
        acks = self._receiver.acks_due(math.inf)
        self._save_state(self._now())
        for room, seq in acks:
            self._enqueue({"type": "ack", "room": room, "seq": seq})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                await self._transport.drain()

    def _load_state(self) -> None:
        if self._state_file is None:
            return
        state = self._state_file.load(self.url)
        if self.user is not None and state.user is not None and state.user != self.user:
            raise StateFileError(self._state_file.path, f"belongs to {state.user!r}, not {self.user!r}")

        self._account = self.user or state.user
        restore(state, self._receiver, self._outbox)
        log.info(
            "state file %s: %d rooms, %d unconfirmed messages",
            self._state_file.path,
            len(state.rooms),
            len(state.outbox),
            extra={"user": self._account},
        )

    def _save_state(self, now: float) -> None:
        self._last_save = now
        if self._state_file is None or not self._state_dirty:
            self._state_dirty = False
            return

        try:
            self._state_file.save(snapshot(self.url, self._account, self._receiver, self._outbox))
        except OSError as error:
            log.error("saving state file %s failed: %s; retrying", self._state_file.path, error)
            return
        self._state_dirty = False

    # Helpers

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _enqueue(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the current connection; dropped while disconnected.

        Dropping is safe: on the next `welcome` the outbox, the pending requests and the receiver's acks
        produce again every frame that still matters.
        """
        if self._connected:
            self._transport.send(frame)

    def _mark_dirty(self) -> None:
        self._state_dirty = True
        self._wake.set()

    def _hello_frame(self) -> dict[str, Any]:
        hello: dict[str, Any] = {"type": "hello"}
        if self._token is None and self.user is not None:
            hello["user"] = self.user
        if self._device is not None:
            hello["device"] = self._device
        if self._batch:
            hello["batch"] = True
        resume = {room: position.to_fields() for room, position in self._receiver.resume_positions().items()}
        if resume:
            hello["resume"] = resume
        return hello

    def _join_frame(self, room: str) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "room": room}
        position = self._receiver.position(room)
        last = self._requests.join_last(room)
        if position is not None:
            frame.update(position.to_fields())
        elif last is not None:
            frame["last"] = last
        return frame

    def _drop_queued(self, room: str) -> None:
        kept = [(message, generation) for message, generation in self._inbox if message.room != room]
        self._inbox.clear()
        self._inbox.extend(kept)

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ClientClosed()

    def _fail_waiters(self, error: ClientError) -> None:
        self._requests.fail_all(error)
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(error)
            # connect() may never be awaited again; mark the exception as retrieved.
            self._first_welcome.exception()


class _TransportListener:
    """Connects the transport's callbacks to the Client's private handlers."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def hello_frame(self) -> dict[str, Any]:
        return self._client._hello_frame()

    def welcomed(self) -> bool:
        return self._client._connected

    def on_text(self, data: str) -> None:
        self._client._handle_text(data)

    def on_connection_lost(self) -> None:
        self._client._on_connection_lost()

    def on_unauthorized(self, reason: str) -> None:
        self._client._stop(Unauthorized(reason))
