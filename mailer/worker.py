"""The send loop: claim due deliveries, personalise, rate-limit, send, record each result.

One asyncio loop drives several reused SMTP sessions (`mailer.smtp.SmtpPool`); database work
runs on one helper thread so that commits never stall the sessions. Results are committed in
groups: a quarter of the capacity (50 by default), or whatever has arrived 50 ms after the
first of them, so a commit is shared by many messages without holding any result for long.

The crash window, honestly: a message whose reply has arrived but whose result is not yet
committed, or whose final dot was sent but no reply read, is in the relay and still `sending`
here. If the worker dies, that row's lease runs out, and it is sent again with the same
Message-ID and marked `taken_over`: at most the messages in flight at the crash (never more
than the worker's capacity, max(2 x smtp_connections, batch), since results not yet committed
count against it). Most of those rows were only claimed, not sent, so before each final dot
the worker commits `dot_at` (`_mark_dot`, begun as the transaction starts), and only a
taken-over row with `dot_at` set is marked `ambiguous` ("may have been sent twice"): what was
on a session or awaiting its commit, at most smtp_connections plus a quarter of the capacity.
A reply that never comes after the final dot ends as `unknown` after `unknown_resends`
resends, also counted.

Rate limits are derived from the outbox (messages claimed or answered in the last minute and
the last 24 hours; each counts from its result, as the relay counts it), so they hold across
restarts and across workers.

On SQLite one worker per database file is allowed (a lock file beside it); PostgreSQL workers
share the outbox through `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from mailer import alerts, dkim, outbox, reference
from mailer.config import Settings
from mailer.deadline import too_late
from mailer.errors import MailerError
from mailer.links import Links
from mailer.models import PERSONAL, DeliveryReason, DeliveryStatus, Edition
from mailer.render import CompiledEdition, MessageRefused, Recipient, build_message
from mailer.signing import SigningError
from mailer.smtp import NOT_STARTED, Outcome, SendResult, SmtpPool
from subscribers import store
from subscribers.db import session_scope, utcnow
from subscribers.models import Channel, Subscriber

log = logging.getLogger(__name__)
T = TypeVar("T")
BUILD = "build"  # the SendResult stage of a message refused before it reached the relay


class WorkerBusy(MailerError):
    """Another worker already sends from this SQLite database."""


@dataclass
class Summary:
    """What one run of the worker did, for `--drain` and the tests."""

    sent: int = 0
    retry: int = 0
    bounced: int = 0
    failed: int = 0
    unknown: int = 0
    halted: list[str] = field(default_factory=list)

    def add(self, status: DeliveryStatus) -> None:
        name = status.value
        if hasattr(self, name):
            setattr(self, name, getattr(self, name) + 1)


@dataclass(frozen=True)
class Policy:
    """How results become delivery states (settings, so tests can shorten them)."""

    retry_base: float
    retry_cap: float
    give_up: timedelta
    unknown_resends: int
    throttle_pause: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(retry_base=settings.retry_base_seconds, retry_cap=settings.retry_cap_seconds,
                   give_up=timedelta(hours=settings.retry_give_up_hours),
                   unknown_resends=settings.unknown_resends)

    def backoff(self, attempts: int) -> timedelta:
        """Exponential backoff with full jitter: uniform(0, min(cap, base * 2^(n-1)))."""
        ceiling = min(self.retry_cap, self.retry_base * 2 ** max(0, attempts - 1))
        return timedelta(seconds=random.uniform(0, ceiling))  # noqa: S311 (not security)

    def decide(self, claim: outbox.Claim, result: SendResult, now: datetime,
               not_after: datetime | None) -> outbox.Result:
        reply = result.reply  # a server's reply text starts with its code
        status = {Outcome.SENT: DeliveryStatus.SENT, Outcome.BOUNCED: DeliveryStatus.BOUNCED,
                  Outcome.FAILED: DeliveryStatus.FAILED}.get(result.outcome)
        if status is not None:
            unbuilt = DeliveryReason.NOT_BUILT if result.stage == BUILD else None
            return outbox.Result(claim.delivery_id, status, result.code, reply,
                                 ambiguous=claim.ambiguous, reason=unbuilt)
        ambiguous = claim.ambiguous
        if result.outcome is Outcome.UNKNOWN:
            # Sent, perhaps: resend (same Message-ID) a bounded number of times, and say so.
            if claim.ambiguous and claim.attempts > self.unknown_resends:
                return outbox.Result(claim.delivery_id, DeliveryStatus.UNKNOWN, result.code,
                                     reply, ambiguous=True)
            ambiguous = True
        late = too_late(not_after, now)
        if late or now - claim.queued_at >= self.give_up:
            why = outbox.DATE_PASSED if late else f"gave up after {claim.attempts} tries"
            final = DeliveryStatus.UNKNOWN if ambiguous else DeliveryStatus.FAILED
            return outbox.Result(claim.delivery_id, final, result.code, f"{reply} ({why})",
                                 ambiguous=ambiguous,
                                 reason=DeliveryReason.DATE_PASSED if late
                                 else DeliveryReason.GAVE_UP)
        wait = self.backoff(claim.attempts)
        if result.throttled:
            wait = max(wait, timedelta(seconds=self.throttle_pause))
        return outbox.Result(claim.delivery_id, DeliveryStatus.RETRY, result.code, reply,
                             next_attempt_at=now + wait, ambiguous=ambiguous)


@dataclass
class _EditionPlan:
    edition_id: int
    slug: str
    topic_id: int | None  # what its unsubscribe link leaves; None: everything
    kind: str
    not_after: datetime | None
    compiled: CompiledEdition
    regions: list[str]


def sqlite_lock_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or \
            parsed.database == ":memory:":
        return None
    return Path(parsed.database + ".worker.lock")


class Worker:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 name: str | None = None, batch: int = 200, poll: float = 1.0,
                 linger: float = 0.05,
                 policy: Policy | None = None, smtp_timeout: float | None = None,
                 data_timeout: float | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.sessions = sessions
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.batch = batch
        self.poll = poll
        self.linger = linger
        self.policy = policy or Policy.from_settings(settings)
        self.smtp_timeout = smtp_timeout or settings.smtp_timeout_seconds
        self.data_timeout = data_timeout
        self.clock = clock
        self.lease = timedelta(seconds=settings.lease_seconds)
        # Time a transaction may still need once started: a row is not begun later than this
        # before its lease ends.
        self.margin = min(self.lease / 2, timedelta(seconds=2 * self.smtp_timeout))
        self.links = Links(settings)
        self.secret = settings.secret()
        self.domain = settings.from_address.rpartition("@")[2] or "localhost"
        # Read now, so a missing or unusable key stops the worker before it claims anything.
        self.signer = dkim.Signer(dkim.load_keys(settings), dkim.signing_processes(settings))
        self.plans: dict[int, _EditionPlan] = {}
        self.summary = Summary()
        self.stopping = asyncio.Event()
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mailer-db")
        # Dot marks hold up a session each until written: they have their own connection
        # (outbox.dot_marker) and thread, not a place in the queue behind claims and results.
        # On SQLite a mark is one local statement, quicker than the hop to a thread, so the
        # loop writes it itself when the helper thread is not in a transaction (this lock
        # says; other processes hold the file for a few milliseconds at most); else the marks'
        # thread waits for the lock, not for SQLite's busy handler, which sleeps 1, 2, 5... ms.
        self._dot_db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mailer-dots")
        self._dot_conn: Connection | None = None
        self._sqlite_turns = (threading.Lock() if sqlite_lock_path(settings.database)
                              else None)
        self._throttled_until: datetime | None = None
        self._halted: set[int] = set()
        self._lock: FileLock | None = None
        self._next_dots: tuple[list[int], asyncio.Future[None]] | None = None
        self._dot_writer: asyncio.Task[None] | None = None

    # ---- database, on the helper threads

    async def _db_call(self, work: Callable[[Session], T]) -> T:
        def unit() -> T:
            with self._turn(), session_scope(self.sessions) as session:
                return work(session)
        return await asyncio.get_running_loop().run_in_executor(self._db, unit)

    def _turn(self) -> contextlib.AbstractContextManager[object]:
        """SQLite's one writer at a time, taken in turns by the helper threads (a no-op on
        PostgreSQL, where rows are locked one by one)."""
        return self._sqlite_turns or contextlib.nullcontext()

    def _acquire(self) -> None:
        path = sqlite_lock_path(self.settings.database)
        if path is None:
            return
        self._lock = FileLock(str(path))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise WorkerBusy(
                "another worker is already sending from this SQLite database",
                hint="run one worker per SQLite file; use PostgreSQL for several") from None

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---- the loop

    async def run(self, drain: bool = False) -> Summary:
        """Send until stopped (SIGTERM/SIGINT), or with `drain` until nothing is due."""
        self._acquire()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread there are no signal handlers: the caller stops us.
            with contextlib.suppress(RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stopping.set)
        try:
            if self._lock is not None:  # we hold the file: nothing else owns a claimed row
                await self._db_call(outbox.release_orphans)
            await self._loop(drain)
        finally:
            self._release()
            self._db.shutdown(wait=True)
            if self._dot_conn is not None:
                self._dot_db.submit(self._dot_conn.close).result()
            self._dot_db.shutdown(wait=True)
            self.signer.close()
        return self.summary

    async def _loop(self, drain: bool) -> None:
        s = self.settings
        inflight: set[asyncio.Task[tuple[outbox.Claim, SendResult]]] = set()
        done: list[tuple[outbox.Claim, SendResult]] = []
        recording = 0  # results taken by the recorder and not yet committed
        room = asyncio.Event()  # a send finished or a result was written: the loop may claim
        wake = asyncio.Event()  # a result waits: the recorder has work
        full = asyncio.Event()  # enough results wait to be worth a commit now
        idle = asyncio.Event()  # the recorder has written everything it was given
        closing = False
        # Claimed rows wait for a free session inside the pool; claiming half a batch at a
        # time keeps claim transactions few without letting the in-flight set grow large.
        # Results not yet committed count against the capacity, so the rows this worker holds
        # as `sending` (what a crash could duplicate) never exceed it.
        capacity = max(2 * s.smtp_connections, self.batch)
        commit_at = max(1, capacity // 4)

        def finished(task: asyncio.Task[tuple[outbox.Claim, SendResult]]) -> None:
            inflight.discard(task)
            if not task.cancelled():
                done.append(task.result())
                idle.clear()
                wake.set()
                if len(done) >= commit_at or not inflight:  # or nothing more is coming
                    full.set()
            room.set()

        async def recorder() -> None:
            # One commit per `commit_at` results, or per `linger` seconds when they come
            # slowly: a commit costs far more than a row, and sends never wait for it.
            nonlocal recording
            while True:
                if done:
                    if len(done) < commit_at and not closing and inflight:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(full.wait(), timeout=self.linger)
                    batch = done[:]
                    del done[:]
                    full.clear()
                    recording = len(batch)
                    try:
                        await self._record(batch)
                    finally:
                        recording = 0
                        room.set()
                    continue
                if closing:
                    return
                idle.set()
                wake.clear()
                await wake.wait()

        writer = asyncio.create_task(recorder())
        try:
            async with SmtpPool(s.smtp_url.get_secret_value(), size=s.smtp_connections,
                                max_per_connection=s.smtp_max_per_connection,
                                timeout=self.smtp_timeout,
                                data_timeout=self.data_timeout) as pool:
                while True:
                    if writer.done():  # the database failed: stop sending what we can't record
                        writer.result()
                    held = len(inflight) + len(done) + recording
                    wanted = 0 if self.stopping.is_set() else capacity - held
                    if held and wanted < capacity // 2:
                        wanted = 0
                    claims: list[outbox.Claim] = []
                    if wanted > 0:
                        allowed = await self._allowance()
                        if allowed > 0:
                            claims = await self._db_call(functools.partial(
                                self._claim, n=min(wanted, allowed, self.batch)))
                    for claim in claims:
                        task = asyncio.create_task(self._send(pool, claim))
                        inflight.add(task)
                        task.add_done_callback(finished)
                    if not inflight:
                        await self._settled(writer, idle)
                        if self.stopping.is_set():
                            return
                        # A finished send's plan is not needed again (a resend builds it
                        # anew); welcomes make one edition per reader, so forget them.
                        for finished_id in await self._db_call(outbox.finish_done):
                            self.plans.pop(finished_id, None)
                        if drain and not await self._due_soon():
                            return
                        await self._idle()
                        continue
                    if not claims:
                        room.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(room.wait(),
                                                   timeout=None if wanted <= 0 else self.poll)
        finally:
            closing = True
            wake.set()
            full.set()
            await writer

    @staticmethod
    async def _settled(writer: asyncio.Task[None], idle: asyncio.Event) -> None:
        """Wait until every result handed to the recorder is written (or it failed)."""
        waiter = asyncio.ensure_future(idle.wait())
        await asyncio.wait({waiter, writer}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if writer.done():
            writer.result()

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=self.poll)

    async def _due_soon(self) -> bool:
        """Is anything due now, or held back only by the rate limit or a throttle? Or held by
        another worker, live or dead: a drain waits for its result or its lease to end rather
        than leave it `sending` (when this worker holds nothing itself, it is not its own)."""
        due, held = await self._db_call(outbox.next_due_at)
        return held is not None or (
            due is not None and due <= self.clock() + timedelta(seconds=self.poll))

    async def _allowance(self) -> int:
        now = self.clock()
        if self._throttled_until and now < self._throttled_until:
            return 0
        per_minute, per_day = self.settings.rate_per_minute, self.settings.rate_per_day
        if not per_minute and not per_day:
            return self.batch

        def count(session: Session) -> int:
            allowed = self.batch
            if per_minute:
                allowed = min(allowed, per_minute - outbox.attempts_since(
                    session, now - timedelta(minutes=1)))
            if per_day and allowed > 0:
                allowed = min(allowed, per_day - outbox.attempts_since(
                    session, now - timedelta(days=1)))
            return allowed
        return max(0, await self._db_call(count))

    def _claim(self, session: Session, n: int) -> list[outbox.Claim]:
        claims = outbox.claim_due(session, self.name, n, self.lease, now=self.clock())
        for claim in claims:
            if claim.edition_id not in self.plans:
                edition = session.get(Edition, claim.edition_id)
                assert edition is not None
                self.plans[claim.edition_id] = _EditionPlan(
                    edition.id, edition.slug,
                    # A mail about the whole subscription offers to leave all of it.
                    None if edition.kind in PERSONAL else outbox.topic_id(session, edition.topic),
                    edition.kind, edition.not_after, CompiledEdition.from_dict(edition.compiled),
                    list(edition.regions or []))
        return claims

    def _envelope_from(self, claim: outbox.Claim) -> str:
        bounce = self.settings.bounce_address or self.settings.from_address
        if self.settings.verp and self.settings.bounce_address:
            return reference.return_path(self.secret, claim.edition_id, claim.subscriber_id,
                                         bounce)
        return bounce

    async def _send(self, pool: SmtpPool, claim: outbox.Claim) -> tuple[outbox.Claim, SendResult]:
        # A row that waits for a session until its lease nearly runs out may already be
        # another worker's: sending it then could deliver it twice. The pool starts it only
        # while there is time left (else NOT_STARTED), and `_record` hands it back.
        start_by = None
        if claim.lease_until is not None:
            start_by = asyncio.get_running_loop().time() + (
                claim.lease_until - self.margin - self.clock()).total_seconds()
        plan = self.plans[claim.edition_id]
        try:
            raw = build_message(
                plan.compiled, Recipient(claim.email, claim.name),
                self.links.recipient(claim.subscriber_id, plan.topic_id, plan.slug,
                                     plan.edition_id, plan.compiled.archive),
                message_id=reference.message_id(self.secret, claim.edition_id,
                                                claim.subscriber_id, self.domain))
            if self.signer:
                raw = await self.signer.sign_async(raw)
        except (MessageRefused, SigningError) as exc:
            return claim, SendResult(Outcome.FAILED, None, None, f"not sent: {exc}", BUILD)
        return claim, await pool.send(self._envelope_from(claim), claim.email, raw,
                                      prepared=True, start_by=start_by,
                                      before_dot=lambda: self._mark_dot(claim.delivery_id))

    def _mark_dot(self, delivery_id: int) -> asyncio.Future[None]:
        """Have `dot_at` committed for this delivery; its final dot waits for the future. Marks
        that come while a commit is under way share the next one (one future for them all),
        so the sessions wait about one commit each rather than one apiece (the D4 bound:
        docs/design.md, crash policy)."""
        if self._next_dots is None:
            self._next_dots = ([], asyncio.get_running_loop().create_future())
        ids, written = self._next_dots
        ids.append(delivery_id)
        if self._dot_writer is None or self._dot_writer.done():
            self._dot_writer = asyncio.create_task(self._write_dots())
        return written

    async def _write_dots(self) -> None:
        while self._next_dots is not None:
            ids, written = self._next_dots
            self._next_dots = None
            try:
                turns = self._sqlite_turns
                if turns is not None and turns.acquire(blocking=False):
                    try:
                        self._write_marks(ids)
                    finally:
                        turns.release()
                else:
                    await asyncio.get_running_loop().run_in_executor(
                        self._dot_db, self._write_marks_in_turn, ids)
            except Exception as exc:  # each waiting send gets the error
                written.set_exception(exc)
            else:
                written.set_result(None)

    def _write_marks_in_turn(self, ids: list[int]) -> None:
        with self._turn():
            self._write_marks(ids)

    def _write_marks(self, ids: list[int]) -> None:
        if self._dot_conn is None:
            self._dot_conn = outbox.dot_marker(self.sessions.kw["bind"])
        outbox.mark_dotted(self._dot_conn, self.name, ids, self.clock())

    async def _record(self, done: list[tuple[outbox.Claim, SendResult]]) -> None:
        now = self.clock()
        results, bounced, halts = [], [], {}
        for claim, result in done:
            if result.stage == NOT_STARTED:  # never sent: back in the queue for any worker
                results.append(outbox.Result(claim.delivery_id, DeliveryStatus.QUEUED, None,
                                             result.reply, ambiguous=claim.ambiguous))
                continue
            if result.outcome is Outcome.HALT:
                halts[claim.edition_id] = f"halted: the relay refused us ({result.reply})"
                # Our side is broken, not this person's address: back in the queue, untouched.
                results.append(outbox.Result(claim.delivery_id, DeliveryStatus.QUEUED,
                                             result.code, result.reply,
                                             ambiguous=claim.ambiguous))
                continue
            if result.throttled:
                self._throttled_until = now + timedelta(seconds=self.policy.throttle_pause)
            decided = self.policy.decide(claim, result, now,
                                         self.plans[claim.edition_id].not_after)
            results.append(decided)
            self.summary.add(decided.status)
            if decided.status == DeliveryStatus.BOUNCED:
                bounced.append((claim.subscriber_id, decided.reply))

        def write(session: Session) -> None:
            outbox.record(session, self.name, results, now=now)
            for subscriber_id, reply in bounced:
                subscriber = session.get(Subscriber, subscriber_id)
                if subscriber is not None:  # erased meanwhile: nothing left to mark
                    store.mark_bounced(session, subscriber, store.Context(
                        channel=Channel.BOUNCE, detail={"smtp": reply[:200]}))
            for edition_id, reason in halts.items():
                if outbox.halt(session, edition_id, reason):
                    self._alert_halt(session, self.plans[edition_id], reason, now)
        await self._db_call(write)
        for edition_id, reason in halts.items():
            if edition_id not in self._halted:
                self._halted.add(edition_id)
                self.summary.halted.append(reason)
                log.error("edition %s %s", edition_id, reason)


    @staticmethod
    def _alert_halt(session: Session, plan: _EditionPlan, reason: str, now: datetime) -> None:
        alerts.raise_alert(
            session, alerts.key_for("halt", plan.edition_id, now.isoformat()), "halt",
            f"Sending of {plan.slug} has stopped: the relay refused our messages",
            f"Sending of the edition {plan.slug} has stopped: {reason}.\n\n"
            "No subscriber was changed, and nothing more of it will be sent until it is "
            "resumed. A refusal like this usually means our SPF, DKIM or DMARC records are "
            "broken, or the relay account's right to send has changed. Once that is fixed, "
            f"resume it on the console or with `mailer edition resume {plan.slug}`: the "
            "messages not yet sent go out then, and nobody gets one twice.",
            regions=plan.regions, now=now)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop where it is installed (a dependency, but for Windows): the
    event loop is much of the worker's CPU, and uvloop's costs about 7 % less a message
    (233 against 252 µs, to smtp-sink with 16 connections)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def run_worker(settings: Settings, sessions: sessionmaker[Session], *, drain: bool = False,
               **kwargs: Any) -> Summary:
    """Run a worker in this thread until it stops (the CLI's `mailer worker`)."""
    # What the process has built so far lives as long as it does (modules, SQLAlchemy's
    # mappers and compiled statements): frozen out of the cyclic collector, a full collection
    # looks only at what the send loop makes, 2 ms instead of 30 (without a collection first,
    # which would cost those 30 ms once more).
    gc.freeze()
    return run_loop(Worker(settings, sessions, **kwargs).run(drain=drain))
