"""Several replicas of one dependency behind one client: `ReplicaPool`, used like `ServiceClient`.

A request that carries an affinity key (for the LLM: the documents at the head of a RAG prompt) goes to the
replica that rendezvous hashing gives that key, so requests sharing a prefix meet the replica whose prefix cache
holds it, and adding or losing a replica moves only the keys it owned. Other requests go to the replica with the
fewest requests in flight (ties: the one that served fewest). A replica that refuses the connection is skipped
for the next in that order. `round_robin` ignores both; it is there to compare against.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import httpx

from common.http import DependencyError, ServiceClient

T = TypeVar("T")
Balance = Literal["affinity", "round_robin"]


def split_urls(urls: str) -> list[str]:
    """`http://a:8000,http://b:8000` (commas or spaces) as a list; one URL is a list of one."""
    found = [u.strip() for u in urls.replace(" ", ",").split(",") if u.strip()]
    if not found:
        raise ValueError("no URL given")
    return found


def _weight(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def _unreachable(exc: DependencyError) -> bool:
    return isinstance(exc.__cause__, httpx.ConnectError)


class ReplicaPool:
    def __init__(self, name: str, urls: list[str], *, balance: Balance = "affinity", **options: Any) -> None:
        assert urls, "a pool needs at least one replica"
        self.name, self.balance = name, balance
        self.base_url = ",".join(urls)
        self.replicas = [ServiceClient(name if len(urls) == 1 else f"{name} ({url})", url, **options) for url in urls]
        self.in_flight = [0] * len(urls)
        self.served = [0] * len(urls)
        self._turn = itertools.count()

    def order(self, affinity: str | None = None) -> list[int]:
        """Replica indexes in the order to try them for one request."""
        count = len(self.replicas)
        if self.balance == "round_robin":
            start = next(self._turn) % count
            return [(start + i) % count for i in range(count)]
        if affinity is not None:
            return sorted(range(count), key=lambda i: -_weight(affinity, self.replicas[i].base_url))
        return sorted(range(count), key=lambda i: (self.in_flight[i], self.served[i], i))

    async def _call(self, affinity: str | None, call: Callable[[ServiceClient], Awaitable[T]]) -> T:
        failure: DependencyError | None = None
        for index in self.order(affinity):
            self.in_flight[index] += 1
            self.served[index] += 1
            try:
                return await call(self.replicas[index])
            except DependencyError as exc:
                if not _unreachable(exc):
                    raise
                failure = exc  # nothing was sent: the next replica may take it
            finally:
                self.in_flight[index] -= 1
        assert failure is not None
        raise failure

    async def get_json(self, path: str, **params: Any) -> Any:
        return await self._call(None, lambda client: client.get_json(path, **params))

    async def post_json(self, path: str, body: dict, *, idempotent: bool = False, affinity: str | None = None) -> Any:
        return await self._call(affinity, lambda client: client.post_json(path, body, idempotent=idempotent))

    async def stream_sse(self, path: str, body: dict, *, affinity: str | None = None) -> AsyncIterator[dict]:
        index = self.order(affinity)[0]
        self.in_flight[index] += 1
        self.served[index] += 1
        try:
            async for event in self.replicas[index].stream_sse(path, body):
                yield event
        finally:
            self.in_flight[index] -= 1

    async def is_ready(self) -> bool:
        """Ready while any replica is."""
        for replica in self.replicas:
            if await replica.is_ready():
                return True
        return False

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.aclose()
