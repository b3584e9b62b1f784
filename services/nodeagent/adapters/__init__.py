"""The node agent's edges: the NATS bus and its JetStream KV buckets and streams."""
