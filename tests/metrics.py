"""One scraper of the gateway's /metrics page, for the suites that read a counter."""

from __future__ import annotations

import aiohttp


async def scrape_metric(port: int, name: str) -> float:
    """The first sample of `name` (labelled or not) on http://127.0.0.1:{port}/metrics;
    0 when the page does not have it yet."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200, await r.text()
            for line in (await r.text()).splitlines():
                if line.startswith((name + " ", name + "{")):
                    return float(line.rsplit(" ", 1)[1])
    return 0.0
