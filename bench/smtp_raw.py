"""Raw SMTP throughput of mailer.smtp against local sinks, beside two peers. Loopback only.

    .venv/bin/python bench/smtp_raw.py [--n 5000] [--n-aiosmtpd 1500] [--conns 1,4,16]

Clients (each run in a fresh process, so CPU and peak RSS are its own):
  pool     mailer.smtp.SmtpPool, one sending task per connection (as the worker will use it)
  bare     a minimal pipelined asyncio client with no error handling at all: the ceiling
  smtplib  stdlib smtplib, one reused connection per thread
Sinks: (a) aiosmtpd counting only, in its own process; (b) Debian's `smtp-sink` (package
`postfix`), skipped with a message when it is not installed. No postfix daemon is needed.

One ~65 KB message (multipart, quoted-printable lines, some starting with a dot) is built once
per process. Prints msgs/s, client CPU (% of one core), sink CPU and client peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FROM = "bounces@news.example.org"


def build_message(size: int = 66_000) -> bytes:
    head = (b"From: MSHT Co-ordinators <bulletin@news.example.org>\r\n"
            b"To: <reader@example.org>\r\nSubject: Quarterly bulletin\r\n"
            b"Message-ID: <bench.1@news.example.org>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n--b1\r\n"
            b"Content-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
    line = b"<p style=3D\"margin:0\">Modern slavery briefing, Kent &amp; Essex, line =\r\n"
    dotted = b".dot-stuffed line, as quoted-printable HTML sometimes has\r\n"
    body = bytearray()
    i = 0
    while len(head) + len(body) < size:
        body += dotted if i % 40 == 0 else line
        i += 1
    return head + bytes(body) + b"--b1--\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no sink on port {port}")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- sinks ----

def serve_aiosmtpd(port: int) -> None:
    from aiosmtpd.controller import Controller

    count = 0

    class Counter:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            nonlocal count
            count += 1
            return "250 OK"

    controller = Controller(Counter(), hostname="127.0.0.1", port=port,
                            server_hostname="sink.local")
    controller.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    controller.stop()
    print(count, flush=True)


def start_sink(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "aiosmtpd":
        cmd = [sys.executable, __file__, "--serve-aiosmtpd", str(port)]
    else:
        cmd = [smtp_sink_path() or "smtp-sink", "-u", "nobody", "-c", "-h", "sink.local",
               "-m", "1024", f"127.0.0.1:{port}", "1024"]
    # smtp-sink -c writes a counter per message: an unread pipe would fill and stall it.
    out = subprocess.PIPE if kind == "aiosmtpd" else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def smtp_sink_path() -> str | None:
    return shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)


# ---- clients (run in a child process) ----

async def client_pool(port: int, n: int, conns: int, data: bytes) -> int:
    from mailer.smtp import Outcome, SmtpPool

    sent = 0
    todo = iter(range(n))
    async with SmtpPool(f"smtp://127.0.0.1:{port}?tls=none", size=conns,
                        max_per_connection=1_000_000, timeout=30) as pool:
        async def worker() -> None:
            nonlocal sent
            for i in todo:
                result = await pool.send(FROM, f"r{i}@example.org", data)
                sent += result.outcome is Outcome.SENT
        await asyncio.gather(*(worker() for _ in range(conns)))
    return sent


async def client_bare(port: int, n: int, conns: int, data: bytes) -> int:
    """The ceiling: pipelined MAIL/RCPT/DATA, bytes.replace dot-stuffing, no checks beyond 2xx."""
    sent = 0
    todo = iter(range(n))

    async def read_reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    async def one_connection() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO bench\r\n")
        await read_reply(reader)
        for i in todo:
            writer.write(b"MAIL FROM:<" + FROM.encode() + b">\r\nRCPT TO:<r%d@example.org>\r\n"
                         b"DATA\r\n" % i)
            for _ in range(3):
                await read_reply(reader)
            writer.write(b"." + data.replace(b"\r\n.", b"\r\n..") if data.startswith(b".")
                         else data.replace(b"\r\n.", b"\r\n.."))
            writer.write(b".\r\n")
            await writer.drain()
            ok = (await read_reply(reader)).startswith(b"2")
            sent += ok  # not `sent += await ...`: that reads `sent` before the await
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        writer.close()

    await asyncio.gather(*(one_connection() for _ in range(conns)))
    return sent


def client_smtplib(port: int, n: int, conns: int, data: bytes) -> int:
    sent = 0
    lock = threading.Lock()
    todo = iter(range(n))

    def one_connection() -> None:
        nonlocal sent
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench", timeout=30) as smtp:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                smtp.sendmail(FROM, [f"r{i}@example.org"], data)
                with lock:
                    sent += 1

    threads = [threading.Thread(target=one_connection) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent


def run_client(variant: str, port: int, n: int, conns: int) -> None:
    import mailer.smtp  # noqa: F401  (imported before the clock starts)

    data = build_message()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if variant == "pool":
        sent = asyncio.run(client_pool(port, n, conns, data))
    elif variant == "bare":
        sent = asyncio.run(client_bare(port, n, conns, data))
    else:
        sent = client_smtplib(port, n, conns, data)
    seconds = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    print(json.dumps({"sent": sent, "seconds": seconds, "cpu": cpu,
                      "maxrss_kb": usage1.ru_maxrss, "bytes": len(data)}))


# ---- the driver ----

def measure(sink: subprocess.Popen[bytes], port: int, variant: str, n: int,
            conns: int) -> dict[str, float]:
    sink_cpu0 = proc_cpu(sink.pid)
    out = subprocess.run([sys.executable, __file__, "--client", variant, "--port", str(port),
                          "--n", str(n), "--conns", str(conns)],
                         capture_output=True, text=True, check=True, timeout=600)
    sink_cpu = proc_cpu(sink.pid) - sink_cpu0
    result = json.loads(out.stdout)
    result["sink_cpu"] = sink_cpu
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="messages per run to smtp-sink")
    parser.add_argument("--n-aiosmtpd", type=int, default=1500,
                        help="messages per run to aiosmtpd (a ~300 msgs/s sink)")
    parser.add_argument("--conns", default="1,4,16")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-aiosmtpd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_aiosmtpd:
        serve_aiosmtpd(args.serve_aiosmtpd)
        return
    if args.client:
        run_client(args.client, args.port, args.n, int(args.conns))
        return

    conns_list = [int(c) for c in args.conns.split(",")]
    size = len(build_message())
    print(f"message {size:,} bytes; {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; python {sys.version.split()[0]}")
    sinks = [("aiosmtpd", args.n_aiosmtpd)]
    if smtp_sink_path():
        sinks.append(("smtp-sink", args.n))
    else:
        print("smtp-sink: not installed, skipped (apt-get install postfix; no daemon needed)")
    header = (f"{'sink':<10} {'client':<8} {'conns':>5} {'msgs':>6} {'msgs/s':>8} "
              f"{'client CPU%':>11} {'sink CPU%':>9} {'peak RSS MB':>11}")
    print(header)
    print("-" * len(header))
    for sink_name, n in sinks:
        sink, port = start_sink(sink_name)
        try:
            for variant in ("pool", "bare", "smtplib"):
                for conns in conns_list:
                    r = measure(sink, port, variant, n, conns)
                    rate = r["sent"] / r["seconds"]
                    flag = "" if r["sent"] == n else f"  ONLY {r['sent']} SENT"
                    print(f"{sink_name:<10} {variant:<8} {conns:>5} {n:>6} {rate:>8,.0f} "
                          f"{100 * r['cpu'] / r['seconds']:>11.0f} "
                          f"{100 * r['sink_cpu'] / r['seconds']:>9.0f} "
                          f"{r['maxrss_kb'] / 1024:>11.1f}{flag}", flush=True)
        finally:
            sink.send_signal(signal.SIGTERM)
            try:
                sink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait()


if __name__ == "__main__":
    main()
