"""I/O at the node agent's edges."""
