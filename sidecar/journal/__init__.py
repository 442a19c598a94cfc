"""The durable call journal and agent checkpoints: a storage protocol and its SQLite backend."""
