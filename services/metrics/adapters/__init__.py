"""I/O of the metrics service: the bus (watching, usage, stats) and HTTP (aiohttp)."""
