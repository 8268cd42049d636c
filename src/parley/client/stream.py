"""The async iterator behind `Client.messages()`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from parley.protocol.model import Message

if TYPE_CHECKING:
    from parley.client.connection import Client


class MessageStream:
    """Delivered messages in order; asking for the next one marks the previous one as handled.

    A class rather than an async generator, so that leaving an `async for` early needs no cleanup, and
    the last message returned stays unhandled until the consumer calls `Client.handled`.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._previous: Message | None = None

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        if self._previous is not None:
            self._client.handled(self._previous)
            self._previous = None

        while True:
            message = self._client._take_message()
            if message is not None:
                self._previous = message
                return message
            if not await self._client._wait_for_message():
                raise StopAsyncIteration
