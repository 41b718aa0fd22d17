"""Password hashing with argon2id, bounded and off the event loop.

Login does the same hash work whether or not the username exists: an unknown user is
verified against a dummy hash made with the same parameters as real ones.
"""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Passwords:
    def __init__(self, hasher: PasswordHasher, concurrency: int) -> None:
        self._hasher = hasher
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self.dummy_hash = hasher.hash(secrets.token_urlsafe(24))
        self.verify_calls = 0  # argon2 verifications done (tests assert on it, not on time)

    async def hash(self, password: str) -> str:
        async with self._sem:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._hasher.hash, password
            )

    async def verify(self, hash: str, password: str) -> bool:
        """True if `password` matches `hash`; False on mismatch or a malformed hash."""
        async with self._sem:
            self.verify_calls += 1
            return await asyncio.get_running_loop().run_in_executor(
                None, self._verify, hash, password
            )

    def _verify(self, hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(hash)
        except InvalidHashError:
            return True
