"""The scheduler's edges: the NATS bus and its JetStream KV buckets."""
