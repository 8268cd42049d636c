"""Parley: a real-time chat-room server with reliable delivery over WebSocket."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
