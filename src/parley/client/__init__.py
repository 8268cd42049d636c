"""The Parley asyncio client library: reliable sends, ordered duplicate-free delivery and resume.

async with Client("ws://127.0.0.1:8765/ws", user="alice") as client:
    await client.join("lobby", last=50)
    await client.send("lobby", "hello")
    async for message in client.messages():
        print(message.sender, message.body)
"""

from parley.client.connection import Client
from parley.client.errors import (
    ClientClosed,
    ClientError,
    RequestFailed,
    SendFailed,
    StateFileError,
    Unauthorized,
)
from parley.client.results import ClientStatistics, HistoryPage, Sent
from parley.client.stream import MessageStream
from parley.protocol.model import Message
from parley.protocol.receiver import Joined, Position

__all__ = [
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientStatistics",
    "HistoryPage",
    "Joined",
    "Message",
    "MessageStream",
    "Position",
    "RequestFailed",
    "SendFailed",
    "Sent",
    "StateFileError",
    "Unauthorized",
]
