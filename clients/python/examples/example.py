import asyncio
import os

from natsgate_client import Client, PasswordLogin


async def main() -> None:
    url = os.environ.get("NATSGATE_URL", "http://localhost:8080")
    tokens = PasswordLogin(url, "alice", os.environ.get("NATSGATE_PASSWORD", "demo"))
    async with Client(url, tokens) as client:  # reconnects, resumes, refreshes its token
        articles = await client.kv_sub("articles")  # every article, then each change
        await articles.synced()
        print(f"{client.user} sees {len(articles.values)} articles")


asyncio.run(main())
