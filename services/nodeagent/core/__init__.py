"""Node agent decisions and decoders, pure and synchronous.

What a node registers, what a slice gets, and what a shared cache file says.
"""
