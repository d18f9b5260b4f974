"""meshd: a peer-to-peer coordinator for edge sites."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2
