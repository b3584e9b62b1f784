"""Pure, synchronous decisions and decoders of the node agent (no I/O, no asyncio)."""
