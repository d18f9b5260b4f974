"""The error hierarchy. Raised deep, caught once at a boundary (packet drop, HTTP error, CLI message)."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error meshd raises on purpose."""


class DecodeError(MeshError):
    """Bytes from the network that are malformed, too big or of an unknown kind."""


class AuthError(DecodeError):
    """An envelope that does not open with any key of the keyring, or from another cluster."""


class ReplayError(AuthError):
    """An authentic envelope seen before, stale for its sender, or meant for another node."""

    def __init__(self, message: str, sender: bytes = b"") -> None:
        super().__init__(message)
        self.sender = sender  # who sealed it (8 bytes; b"": unknown), for rate-limited warnings


class ConfigError(MeshError):
    """Bad configuration; the message names the key or flag."""


class StateError(MeshError):
    """A request that does not fit the current state (leave twice, unknown key id, ...)."""


class IntegrityError(MeshError):
    """Content whose hash or signature does not match (chunks, manifests)."""
