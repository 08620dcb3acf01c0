"""The authority: answers DNS queries for the servers, with a reply cache and held answers."""

from __future__ import annotations

import trio

from ..config import Config
from ..errors import BootFailed
from ..lifecycle.supervisor import ServiceAnswer, Supervisor
from .answer import Catalog, Response, respond

CACHE_SIZE = 4096


class Authority:
    """Answers queries for the servers: the reply cache, the supervisor calls, held answers.

    Authoritative only: it never resolves anything. Replies are cached by the query bytes
    less the ID, for the supervisor's current generation, so repeated queries for a ready
    service cost a dictionary look-up, not a parse.
    """

    def __init__(self, config: Config, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.catalog = Catalog(config.dns, config.services)
        self._cache: dict[tuple[bool, bytes], tuple[int, bytes, str | None]] = {}
        self.held = 0

    def answer_now(self, wire: bytes, udp: bool) -> Response:
        """Answer at once, or say the answer must be held (``pending``)."""
        sup = self.supervisor
        key = (udp, wire[2:])
        hit = self._cache.get(key)
        if hit is not None and hit[0] == sup.generation:
            _, tail, service = hit
            if service is not None:
                sup.request(service)
            return Response(wire[:2] + tail, service, cacheable=True)
        generation = sup.generation
        resp = respond(wire, self.catalog, sup.answer, udp=udp)
        if resp.service is not None:
            sup.request(resp.service)
        if resp.cacheable and resp.reply is not None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = (generation, resp.reply[2:], resp.service)
        return resp

    async def answer_held(self, wire: bytes, udp: bool, service: str) -> bytes | None:
        """Wait for a ``wait`` service to be ready (or fail), then answer."""
        sup = self.supervisor
        svc = self.config.service(service)
        failed = False
        self.held += 1
        try:
            with trio.fail_after(svc.boot_timeout + 1):
                await sup.acquire(service)
        except (BootFailed, trio.TooSlowError):
            failed = True
        finally:
            self.held -= 1

        def lookup(name: str) -> ServiceAnswer:
            ans = sup.answer(name)
            return ServiceAnswer(servfail=True) if failed or ans.pending else ans

        return respond(wire, self.catalog, lookup, udp=udp).reply
