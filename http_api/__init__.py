"""The HTTP API: auth, users, articles and commands; every write goes into NATS."""
