"""The node agent's edges: the NATS bus, its JetStream KV buckets and streams, and the shared cache files."""
