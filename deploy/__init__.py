"""The deploy stack: configs rendered from settings, supervisord, nginx, NATS (see README)."""
