"""The HTTP API: auth, users, articles and commands; every write goes into NATS."""

__version__ = "0.1.0"
