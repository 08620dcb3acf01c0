"""The authority: answers DNS queries for the servers, with a reply cache and held answers."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Protocol

import trio

from ..config import Config
from ..errors import BootFailed
from ..lifecycle.answers import ServiceSnapshot
from ..lifecycle.state import State
from . import build as b
from . import stats
from . import wire as w
from .answer import Catalog, QueryCookie, Response, respond
from .cookies import VALID, ServerCookies, address_bytes


class Services(Protocol):
    """What the authority needs of the supervisor (which dns/ does not import)."""

    #: Bumped on every change of any service's state; cached replies are for one generation.
    generation: int

    def request(self, name: str, source: str | None = None, *, proven: bool = True) -> object:
        """Note a lookup of service ``name`` (from ``source``; ``proven`` when that address
        cannot be forged) and make sure it is starting or ready; None when nothing is
        starting (backoff, refused, wake-limited)."""

    def snapshot(self, name: str) -> ServiceSnapshot:
        """Service ``name``'s state now."""

    async def acquire(self, name: str, *, proven: bool = True) -> object:
        """Wait until service ``name`` is ready; BootFailed if it cannot be."""

#: A cached reply: the generation it is for, the reply less its ID, the service it named,
#: its query counter's cell, and its RRL identity.
_Entry = tuple[int, bytes, "str | None", list[int], int]

#: Bounds of the reply cache: entries, and bytes of keys and replies together.
CACHE_ENTRIES = 4096
CACHE_BYTES = 4 << 20


class Authority:
    """Answers queries for the servers: the reply cache, the supervisor calls, held answers.

    Authoritative only: it never resolves anything. Replies about names that exist are
    cached for the supervisor's current generation, keyed by the query less its ID, so that
    repeated queries for a ready service cost a dictionary look-up, not a parse. Only
    canonical queries are cached (one message, no trailing bytes, no EDNS options: then the
    bytes are exactly the question, the flags and the OPT's fields), so padding cannot grow
    the cache; unknown names are not cached at all (a random-name flood would only push the
    useful entries out). The cache is emptied when it reaches either bound.

    DNS cookies (RFC 7873, :mod:`.cookies`): a query's COOKIE option is taken out before
    anything else (:func:`wire.split_cookie`), so the query without it is answered (and
    cached) as any other, and the reply gets the server's COOKIE option afterwards. A lookup
    is proven (``supervisor.request(..., proven=True)``: it may evict) over TCP, or over UDP
    with a valid server cookie. The cookie's secret lives as long as the authority.
    """

    def __init__(self, config: Config, supervisor: Services, *, counting: bool = True) -> None:
        self.config = config
        self.supervisor = supervisor
        self.catalog = Catalog(config.dns, config.services)
        self._caches: tuple[dict[bytes, _Entry], ...] = ({}, {})
        self._cache_bytes = 0
        self.held = 0
        #: Queries that hit a bug in the answer logic (answered with a SERVFAIL).
        self.internal_errors = 0
        #: Queries answered (or dropped), by ``(transport, qtype, rcode)`` (see :mod:`.stats`);
        #: a held answer is counted when it is sent. Each count is a one-element list that
        #: cache entries share, so a cached answer costs one list increment (a Counter keyed
        #: by the tuple costs about ten times as much). Not counted with ``counting`` off
        #: (the daemon turns it off when it serves no metrics).
        self.queries: dict[stats.Key, list[int]] = {}
        self.counting = counting
        self.cookies = ServerCookies()
        #: Queries with a COOKIE option, by their server cookie: ``valid``, ``invalid``,
        #: ``none`` (a client cookie alone). A held answer is counted once, when it came.
        self.cookies_seen: collections.Counter[str] = collections.Counter()
        #: The wall clock (seconds since the epoch) that cookie timestamps use.
        self.clock = time.time

    def reconfigure(self, config: Config) -> None:
        """Answer from ``config`` from now on (a reload): a new catalog and empty reply
        caches, switched synchronously, so every query is answered wholly from the old
        config or wholly from the new one."""
        self.config = config
        self.catalog = Catalog(config.dns, config.services)
        for cache in self._caches:
            cache.clear()
        self._cache_bytes = 0

    def answer_now(self, wire: bytes, udp: bool, source: str | None = None) -> Response:
        """Answer at once, or say the answer must be held (``pending``). ``source`` is the
        client's address (wake limits, DNS cookies)."""
        sup = self.supervisor
        cookie: QueryCookie | None = None
        unsplit = False  # it may hold a COOKIE option that the fast split did not take out
        # Most queries end with an OPT without options (its zero data length) or have none.
        if wire[-2:] != b"\0\0" and len(wire) > 12 and wire[11]:
            split = w.split_cookie(wire)
            if split is not None:
                wire, option, payload = split
                cookie = QueryCookie(option, payload)
            else:
                unsplit = True
        cache = self._caches[udp]
        key = wire[2:]
        hit = cache.get(key)
        if hit is not None and hit[0] == sup.generation:
            _, tail, service, cell, identity = hit
            if self.counting:
                cell[0] += 1
            reply = wire[:2] + tail
            proven = not udp
            if cookie is not None:
                option, valid = self._server_cookie(cookie, source, count=True)
                reply = self._add_cookie(reply, option, cookie, udp)
                proven = proven or valid
            if service is not None:
                sup.request(service, source, proven=proven)
            return Response(reply, service, cacheable=True, identity=identity)
        generation = sup.generation
        option = b""
        proven = not udp
        if cookie is not None:
            option, valid = self._server_cookie(cookie, source, count=True)
            proven = proven or valid

        def ask(name: str) -> ServiceSnapshot:
            # The supervisor first (activity, a start, a dead instance noticed), then the
            # snapshot the pure answer is computed from, once.
            nonlocal cookie, option, proven
            if unsplit and cookie is None and not proven:
                cookie = _cookie_of(wire)
                if cookie is not None:
                    option, proven = self._server_cookie(cookie, source, count=True)
            started = sup.request(name, source, proven=proven) is not None
            snap = sup.snapshot(name)
            return snap if started else dataclasses.replace(snap, starting=False)

        resp = respond(wire, self.catalog, ask, trio.current_time(), udp=udp)
        if cookie is None and resp.cookie is not None:  # (one that named no service)
            cookie = resp.cookie
            option = self._server_cookie(cookie, source, count=True)[0]
        cell = self._cell(stats.key_of(wire, resp.reply, udp))
        if self.counting and not resp.pending:
            cell[0] += 1
        if resp.cacheable and resp.reply is not None:
            self._store(cache, key, hit, (generation, resp.reply[2:], resp.service, cell,
                                          resp.identity))
        elif resp.internal_error:
            self.internal_errors += 1
        if cookie is not None and resp.reply is not None:
            resp = resp._replace(reply=self._add_cookie(resp.reply, option, cookie, udp))
        return resp

    def _store(self, cache: dict[bytes, _Entry], key: bytes, stale: _Entry | None,
               entry: _Entry) -> None:
        """Cache ``entry`` under ``key`` (replacing ``stale``, an older generation's),
        emptying both caches first when either bound would be passed."""
        size = len(key) + len(entry[1])
        if len(cache) >= CACHE_ENTRIES or self._cache_bytes + size > CACHE_BYTES:
            for c in self._caches:
                c.clear()
            self._cache_bytes = 0
            stale = None
        if stale is not None:
            self._cache_bytes -= len(key) + len(stale[1])
        cache[key] = entry
        self._cache_bytes += size

    def _server_cookie(self, cookie: QueryCookie, source: str | None, *,
                       count: bool) -> tuple[bytes, bool]:
        """The reply's COOKIE option for a query's ``cookie`` from ``source``, and whether
        the query's server cookie was valid (its source is proven)."""
        option, status = self.cookies.answer(cookie.option, address_bytes(source) or b"",
                                             int(self.clock()))
        if count:
            self.cookies_seen[status] += 1
        return option, status == VALID

    def _add_cookie(self, reply: bytes, option: bytes, cookie: QueryCookie, udp: bool) -> bytes:
        """``reply`` with the COOKIE ``option`` in its OPT, within a UDP reply's bound (the
        query's payload size, at least 512, at most ours: as the answer logic has it)."""
        limit = min(max(512, cookie.payload), self.catalog.edns_payload) if udp else 65535
        return b.add_option(reply, option, limit)

    async def answer_held(self, wire: bytes, udp: bool, service: str,
                          source: str | None = None) -> Response:
        """Wait for a ``wait`` service to be ready (or fail), then answer. ``source`` is the
        client's address (DNS cookies)."""
        sup = self.supervisor
        failed = False
        self.held += 1
        # The query was counted and its start requested when it came (answer_now); the
        # wait must not turn an unproven lookup into a proven one (a restart may evict).
        proven = not udp
        query = w.parse_query(wire)
        if not proven and query.cookie is not None and query.edns is not None:
            proven = self._server_cookie(QueryCookie(query.cookie, query.edns.payload),
                                         source, count=False)[1]
        try:
            # A reload removed the service since the query came: answer from the new config.
            svc = self.config.service(service)
            # Bounded by the admission queue's wait and then the boot.
            with trio.fail_after(svc.boot_timeout + self.config.host.queue_timeout + 1):
                await sup.acquire(service, proven=proven)
        except (BootFailed, trio.TooSlowError, KeyError):
            failed = True
        finally:
            self.held -= 1

        def state(name: str) -> ServiceSnapshot:
            snap = sup.snapshot(name)
            if failed or snap.state is not State.READY:
                return ServiceSnapshot(State.FAILED, None, math.inf)  # the policy's SERVFAIL
            return snap

        resp = respond(wire, self.catalog, state, trio.current_time(), udp=udp)
        if resp.cookie is not None and resp.reply is not None:
            option = self._server_cookie(resp.cookie, source, count=False)[0]
            resp = resp._replace(reply=self._add_cookie(resp.reply, option, resp.cookie, udp))
        if self.counting:
            self._cell(stats.key_of(wire, resp.reply, udp))[0] += 1
        return resp

    def _cell(self, key: stats.Key) -> list[int]:
        cell = self.queries.get(key)
        if cell is None:
            cell = self.queries[key] = [0]
        return cell


def _cookie_of(wire: bytes) -> QueryCookie | None:
    """The COOKIE option of a query that :func:`wire.split_cookie` could not split."""
    try:
        q = w.parse_query(wire)
    except Exception:
        return None
    if q.cookie is None or q.edns is None:
        return None
    return QueryCookie(q.cookie, q.edns.payload)
