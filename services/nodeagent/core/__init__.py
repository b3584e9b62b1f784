"""Node agent decisions, pure and synchronous: what a node registers and what a slice gets."""
