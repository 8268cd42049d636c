"""Requests that wait for the server's reply: sends, joins, leaves and history reads.

Each request is a future. A join, leave or history request that has no reply yet is sent again after a
reconnect, because its frame may have been lost with the old connection. The outbox resends sends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from parley.client.results import HistoryPage, Sent
from parley.protocol.receiver import Joined


class PendingRequests:
    """The futures of every request waiting for a reply, keyed as the server's replies identify them."""

    def __init__(self) -> None:
        self._sends: dict[tuple[str, str], asyncio.Future[Sent]] = {}
        self._joins: dict[str, int | None] = {}
        self._join_waiters: dict[str, list[asyncio.Future[Joined]]] = {}
        self._leave_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._history: dict[str, tuple[dict[str, Any], asyncio.Future[HistoryPage]]] = {}

    def add_send(self, room: str, message_id: str) -> asyncio.Future[Sent]:
        future: asyncio.Future[Sent] = asyncio.get_running_loop().create_future()
        self._sends[(room, message_id)] = future
        return future

    def confirm_send(self, sent: Sent) -> None:
        _resolve(self._sends.pop((sent.room, sent.id), None), sent)

    def fail_send(self, room: str, message_id: str, error: BaseException) -> None:
        _reject(self._sends.pop((room, message_id), None), error)

    def add_join(self, room: str, last: int | None) -> asyncio.Future[Joined]:
        future: asyncio.Future[Joined] = asyncio.get_running_loop().create_future()
        self._joins[room] = last
        self._join_waiters.setdefault(room, []).append(future)
        return future

    def join_last(self, room: str) -> int | None:
        """Return the `last` of a pending join of `room`, or None."""
        return self._joins.get(room)

    def pending_joins(self) -> list[str]:
        return list(self._joins)

    def complete_join(self, joined: Joined) -> None:
        self._joins.pop(joined.room, None)
        for future in self._join_waiters.pop(joined.room, []):
            _resolve(future, joined)

    def fail_join(self, room: str, error: BaseException) -> None:
        self._joins.pop(room, None)
        for future in self._join_waiters.pop(room, []):
            _reject(future, error)

    def add_leave(self, room: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leave_waiters.setdefault(room, []).append(future)
        return future

    def pending_leaves(self) -> list[str]:
        return list(self._leave_waiters)

    def complete_leave(self, room: str) -> None:
        for future in self._leave_waiters.pop(room, []):
            _resolve(future, None)

    def fail_leave(self, room: str, error: BaseException) -> None:
        for future in self._leave_waiters.pop(room, []):
            _reject(future, error)

    def add_history(self, request_id: str, frame: dict[str, Any]) -> asyncio.Future[HistoryPage]:
        future: asyncio.Future[HistoryPage] = asyncio.get_running_loop().create_future()
        self._history[request_id] = (frame, future)
        return future

    def has_history(self, request_id: str) -> bool:
        return request_id in self._history

    def history_frames(self) -> list[dict[str, Any]]:
        return [frame for frame, _ in self._history.values()]

    def complete_history(self, request_id: str, page: HistoryPage) -> None:
        _, future = self._history.pop(request_id, (None, None))
        _resolve(future, page)

    def fail_history(self, request_id: str, error: BaseException) -> None:
        _, future = self._history.pop(request_id, (None, None))
        _reject(future, error)

    def forget_history(self, request_id: str) -> None:
        self._history.pop(request_id, None)

    def fail_all(self, error: BaseException) -> None:
        """Fail every pending request with `error`, when the client closes or stops."""
        for future in self._sends.values():
            _reject(future, error)
        for join_waiters in self._join_waiters.values():
            for join_future in join_waiters:
                _reject(join_future, error)
        for leave_waiters in self._leave_waiters.values():
            for leave_future in leave_waiters:
                _reject(leave_future, error)
        for _, history_future in self._history.values():
            _reject(history_future, error)
        # Callers often drop the futures of send_nowait(), so asyncio would log every one of them as an
        # exception never retrieved; after a close or a fatal error that log line would be noise.
        retrievable: list[asyncio.Future[Any]] = [*self._sends.values()]
        retrievable += [future for _, future in self._history.values()]
        for future in retrievable:
            if future.done() and not future.cancelled():
                future.exception()

        self._sends.clear()
        self._joins.clear()
        self._join_waiters.clear()
        self._leave_waiters.clear()
        self._history.clear()


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
