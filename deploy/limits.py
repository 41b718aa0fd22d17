"""Every connection limit of a stack, derived from MAX_CONNECTIONS and the fd limit.

One number says how many live connections (WebSockets and long-poll sessions) this host
holds; nginx's worker limits, supervisord's `minfds` and each gateway's own cap follow from
it, so nginx never runs out of worker connections before the gateways answer 503.

A proxied WebSocket takes two of an nginx worker's connections (client and gateway) and one
fd in a gateway. nginx's workers listen with `reuseport`, so the kernel spreads new
connections over them by hash: each worker is sized for its share plus `SKEW`, and there are
as many workers as the fd limit needs (at least one per core), each allowed twice its
connections in fds.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass

from shared.settings import Settings

# fds of a process beyond its connections: NATS, API and static requests, upstream
# keepalives, logs, open_file_cache.
HEADROOM = 1024
# A worker's share of the hashed connections may exceed the mean by this much (binomial
# spread: at 10,000 per worker one standard deviation is ~1 %).
SKEW = 1.25
MAX_NGINX_WORKERS = 64


def hard_nofile() -> int:
    """The hard fd limit this process (and so every process of the stack) may raise to."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


@dataclass(frozen=True)
class Limits:
    max_connections: int
    gateway_cap: int  # sessions one gateway process admits; then 503
    gateway_nofile: int
    nginx_workers: int
    worker_connections: int
    nginx_nofile: int  # worker_rlimit_nofile

    @classmethod
    def of(cls, settings: Settings, hard: int | None = None) -> Limits:
        hard = hard_nofile() if hard is None else hard
        total = 2 * settings.max_connections

        def share(workers: int) -> int:
            return math.ceil(total * SKEW / workers) + HEADROOM if workers > 1 else total + HEADROOM

        workers = max(1, os.cpu_count() or 1)
        while 2 * share(workers) > hard and workers < MAX_NGINX_WORKERS:
            workers += 1
        cap = settings.gateway_max_connections
        return cls(
            max_connections=settings.max_connections,
            gateway_cap=cap,
            gateway_nofile=cap + HEADROOM,
            nginx_workers=workers,
            worker_connections=share(workers),
            # Twice the connections (nginx's advice, and gixy's check): a request may hold
            # a file or a temp file beside its connection.
            nginx_nofile=2 * share(workers),
        )

    @property
    def minfds(self) -> int:
        """What supervisord raises its soft limit to; every program inherits it."""
        return max(self.gateway_nofile, self.nginx_nofile)

    def problem(self, settings: Settings, hard: int | None = None) -> str | None:
        """Why this host cannot hold MAX_CONNECTIONS, saying what to raise; None if it can."""
        hard = hard_nofile() if hard is None else hard
        if self.minfds <= hard:
            return None
        procs = math.ceil(settings.max_connections / max(1, hard - HEADROOM))
        fits = (hard - HEADROOM) * settings.gateway_procs
        return (
            f"MAX_CONNECTIONS={settings.max_connections} needs {self.minfds} open files per "
            f"process ({self.gateway_cap} per gateway over GATEWAY_PROCS="
            f"{settings.gateway_procs}, {self.nginx_workers} nginx workers of "
            f"{self.worker_connections}), but the hard limit is {hard} (`ulimit -Hn`). Raise "
            f"it to {self.minfds} (as root `ulimit -Hn {self.minfds}`; systemd LimitNOFILE=; "
            f"/etc/security/limits.conf nofile; docker --ulimit nofile={self.minfds}), "
            f"or set GATEWAY_PROCS={max(procs, settings.gateway_procs + 1)}, "
            f"or MAX_CONNECTIONS={fits} or less"
        )
