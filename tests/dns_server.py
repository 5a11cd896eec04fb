"""A real authoritative DNS server on loopback (UDP and TCP on one random port) for the tests.

The zone is a dict the test may change while the server runs: {(name, type): [rdata text]},
names absolute or relative to nothing (a trailing dot is added). dnspython parses the queries
and builds the answers; a name with no records at all answers NXDOMAIN, a known name without
the asked type answers NOERROR with no answer, and an answer too big for the query's UDP
payload is sent truncated so the resolver retries over TCP, as a real server does.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[tuple[str, str], list[str]]


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


class DnsServer:
    def __init__(self, zone: Zone | None = None) -> None:
        self.zone: Zone = zone if zone is not None else {}
        self.queries: list[tuple[str, str]] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._servers: list[socketserver.BaseServer] = []

    # ---- answers

    def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower()
        kind = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, kind))
        zone = {(_absolute(n).lower(), t.upper()): v for (n, t), v in self.zone.items()}
        records = zone.get((name, kind))
        if records:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 300, dns.rdataclass.IN, question.rdtype, records))
        elif not any(n == name for n, _ in zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if max_size is None:
            return response.to_wire()
        limit = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    # ---- serving

    def start(self) -> DnsServer:
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = outer.answer(data, max_size=512)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    while True:
                        head = self.request.recv(2, socket.MSG_WAITALL)
                        if len(head) < 2:
                            return
                        (size,) = struct.unpack("!H", head)
                        reply = outer.answer(self.request.recv(size, socket.MSG_WAITALL), None)
                        if reply is None:
                            return
                        self.request.sendall(struct.pack("!H", len(reply)) + reply)

        for _ in range(20):  # UDP and TCP on the same free port
            udp = socketserver.ThreadingUDPServer((self.host, 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), Tcp)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port for UDP and TCP")
        udp.daemon_threads = tcp.daemon_threads = True
        self.port = port
        self._servers = [udp, tcp]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def txt(self, name: str) -> bytes | None:
        """The TXT record at `name` as dkimpy's dnsfunc wants it, asked over the wire."""
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        try:
            answer = resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]


@contextlib.contextmanager
def serving(zone: Zone | None = None) -> Iterator[DnsServer]:
    server = DnsServer(zone).start()
    try:
        yield server
    finally:
        server.stop()
