"""The operator HTTP API (aiohttp)."""
