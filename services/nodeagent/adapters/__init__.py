"""The node agent's edges: the NATS bus, its KV buckets and streams, shared cache files."""
