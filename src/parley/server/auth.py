"""Authentication: HS256 tokens (`sub` is the user, `exp` is checked) or open mode for development."""

from __future__ import annotations

import time

import jwt

from parley.protocol.frames import NAME_PATTERN

TOKEN_ALGORITHM = "HS256"


class AuthError(Exception):
    """Credentials are missing, invalid or expired; the message is safe to show the client."""


class Authenticator:
    """Turns the credentials a client presented into a user name."""

    def __init__(self, secret: str | None, open_mode: bool) -> None:
        self.secret = secret
        self.open_mode = open_mode

    def authenticate(self, token: str | None, user: str | None) -> str:
        """Return the user behind a token, or the named user in open mode; raise AuthError otherwise."""
        if token is not None and self.secret is not None:
            return verify_token(token, self.secret)
        if self.open_mode and user is not None:
            return user
        if self.open_mode:
            raise AuthError("open mode: give `user` in hello")
        raise AuthError("a valid token is required (Authorization: Bearer, ?token= or `token` in hello)")


def verify_token(token: str, secret: str) -> str:
    try:
        claims = jwt.decode(token, secret, algorithms=[TOKEN_ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as error:
        raise AuthError(f"invalid token: {error}") from None
    user = claims.get("sub")
    if not isinstance(user, str) or NAME_PATTERN.fullmatch(user) is None:
        raise AuthError("invalid token: `sub` must be a user name of 1 to 64 of A-Z a-z 0-9 . _ : -")
    return user


def mint_token(user: str, secret: str, ttl: float = 30 * 86400, now: float | None = None) -> str:
    """Sign a token for `user` that expires after `ttl` seconds."""
    if NAME_PATTERN.fullmatch(user) is None:
        raise ValueError(f"invalid user name {user!r}: must be 1 to 64 of A-Z a-z 0-9 . _ : -")
    issued = int(time.time() if now is None else now)
    return jwt.encode(
        {"sub": user, "iat": issued, "exp": issued + int(ttl)}, secret, algorithm=TOKEN_ALGORITHM
    )
