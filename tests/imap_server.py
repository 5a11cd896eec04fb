"""A real IMAP4rev1 server for the bounce-mailbox tests: pymap's in-memory backend, in process.

pymap (MIT, on PyPI) is a complete asyncio IMAP server: LOGIN and AUTHENTICATE, STARTTLS,
EXAMINE/SELECT, UID SEARCH and FETCH, flags. The tests run it on loopback on a thread of its
own, with one user whose mailboxes hold the messages given (each with the time it arrived, if
given), and read its flags afterwards to see
that `mailer bounces fetch` changed nothing. `tls`: `none`, `starttls` (LOGIN only after
STARTTLS, as a real server is set up) or `ssl` (implicit TLS, IMAPS on 993).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from argparse import Namespace
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from proxyprotocol.reader import ProxyProtocolReader
from pymap.backend.dict import Config, DictBackend, Login
from pymap.imap import IMAPServer
from pymap.parsing.message import AppendMessage

USER, PASSWORD = "bounces@news.example.police.uk", "imap-test-password"
WAIT = 30.0


class ImapServer:
    def __init__(self, mailboxes: Mapping[str, Sequence[bytes | tuple[bytes, datetime]]], *,
                 tls: str = "none",
                 server_context: ssl.SSLContext | None = None) -> None:
        if tls != "none" and server_context is None:
            raise ValueError("TLS needs a server context")
        self.mailboxes = {name: list(messages) for name, messages in mailboxes.items()}
        self.tls, self.server_context = tls, server_context
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._boxes: dict[str, Any] = {}
        self._ready = threading.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="imap-server", daemon=True)

    def __enter__(self) -> ImapServer:
        self._thread.start()
        if not self._ready.wait(WAIT) or self._failure:
            raise RuntimeError(f"the IMAP server did not start: {self._failure}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test by __enter__
            self._failure.append(exc)
            self._ready.set()

    async def _main(self) -> None:
        args = Namespace(debug=False, passlib_cfg=None, proxy_protocol=None,
                         inherited_sockets=None)
        starttls = self.tls == "starttls"
        config = Config(args, host="127.0.0.1", port=0, demo_data=False, demo_user=USER,
                        demo_password=PASSWORD,
                        ssl_context=self.server_context if starttls else None,
                        tls_enabled=starttls, secure_auth=starttls,
                        reject_dnsbl=False,  # no DNS lookups from a test
                        invalid_user_sleep=0.0)
        login = Login(config)
        await DictBackend._add_demo_user(config, login)
        config.apply_context()
        async with login.demo_user_identity.new_session() as session:
            for name, messages in self.mailboxes.items():
                if name != "INBOX":
                    await session.mailbox_set.add_mailbox(name)
                box = await session.mailbox_set.get_mailbox(name)
                for item in messages:  # a message, or (message, when it arrived)
                    raw, arrived = item if isinstance(item, tuple) else (item, datetime.now(UTC))
                    await box.append(AppendMessage(raw, arrived, frozenset()))
                self._boxes[name] = box
        callback = ProxyProtocolReader(config.proxy_protocol).get_callback(
            IMAPServer(login, config))
        server = await asyncio.start_server(
            callback, host="127.0.0.1", port=0,
            ssl=self.server_context if self.tls == "ssl" else None)
        self.port = server.sockets[0].getsockname()[1]
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        async with server:
            await self._stop.wait()

    def flags(self, mailbox: str = "INBOX") -> list[frozenset[str]]:
        """Each message's flags, in order, as the server now holds them."""
        async def read() -> list[frozenset[str]]:
            return [frozenset(str(f) for f in m.permanent_flags)
                    async for m in self._boxes[mailbox].messages()]

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(WAIT)
