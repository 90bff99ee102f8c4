"""A real TCP proxy for fault tests: it forwards 127.0.0.1:<port> to a target (an S3 endpoint) and, when told,
makes that target go away for a few seconds, the way a hung or unreachable endpoint does.

    proxy = ProxyProcess.start("127.0.0.1", 9000)   # its own process: proxy.port, proxy.pid, proxy.control
    command(proxy.control, "cut 6 40000")           # gone for 6 s once 40,000 more bytes passed
    command(proxy.control, "stats")                 # {"connections": ..., "abandoned": ..., ...}
    proxy.stop()

`python tests/tcp_proxy.py HOST PORT` runs it and prints `<port> <control port>` once it listens. Control:
one line per connection to the control port, answered with one JSON line:

    cut SECONDS AFTER_BYTES     once AFTER_BYTES more bytes came from clients, every open connection is
                                reset and every new one too, for SECONDS (an endpoint gone)
    stats                       counters: connections, bytes_up, bytes_down, abandoned (a client closed or
                                reset its connection while its request had no answer yet: it gave up),
                                reset (connections the proxy reset), outages (each one started)

A hung endpoint instead of a gone one: SIGSTOP the proxy's process (`pid`), SIGCONT it later.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

CHUNK = 64 * 1024


def command(control: tuple[str, int] | list, line: str, timeout: float = 30.0) -> dict[str, Any]:
    """Send one control line to the proxy at `control` (host, port); its JSON answer."""
    with socket.create_connection(tuple(control), timeout=timeout) as sock:
        sock.sendall(line.encode() + b"\n")
        return json.loads(sock.makefile("rb").readline())


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or unplugged peer's kernel answers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass(eq=False)
class _Link:
    client: socket.socket
    upstream: socket.socket
    awaiting_answer: bool = False  # the client sent bytes the target has not answered yet
    task: asyncio.Task | None = None


@dataclass
class Proxy:
    target: tuple[str, int]
    stats: dict[str, Any] = field(
        default_factory=lambda: {
            "connections": 0, "bytes_up": 0, "bytes_down": 0, "abandoned": 0, "reset": 0, "outages": [],
        }
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.cut_until = 0.0
        self.armed: tuple[str, float, int] | None = None  # (kind, seconds, client bytes still to pass)
        self.links: set[_Link] = set()

    # ---- data path ---------------------------------------------------------------------------------------
    async def accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(listener)
            self.stats["connections"] += 1
            if self._cutting():
                self.stats["reset"] += 1
                _reset(client)
                continue
            asyncio.ensure_future(self._serve(client))

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        client.setblocking(False)
        try:
            await loop.sock_connect(upstream, self.target)
        except OSError:
            upstream.close()
            _reset(client)
            return
        link = _Link(client, upstream)
        self.links.add(link)
        link.task = asyncio.ensure_future(
            asyncio.gather(self._pump(link, towards_target=True), self._pump(link, towards_target=False))
        )
        try:
            await link.task
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            self.links.discard(link)
            for sock in (client, upstream):
                if sock.fileno() != -1:
                    sock.close()

    async def _pump(self, link: _Link, towards_target: bool) -> None:
        loop = asyncio.get_running_loop()
        source, sink = (link.client, link.upstream) if towards_target else (link.upstream, link.client)
        try:
            while True:
                data = await loop.sock_recv(source, CHUNK)
                if not data:
                    break
                if towards_target:
                    link.awaiting_answer = True
                    passed = self._count_client_bytes(len(data))
                    data = data[:passed]  # up to the outage's trigger: the rest is cut
                else:
                    link.awaiting_answer = False
                    self.stats["bytes_down"] += len(data)
                if data:
                    await loop.sock_sendall(sink, data)
        except ConnectionError:
            pass
        if towards_target and link.awaiting_answer:
            self.stats["abandoned"] += 1  # the client gave up on its request (timeout, retry)
        link.task.cancel()  # one side is done: so is the connection

    def _count_client_bytes(self, size: int) -> int:
        """Count `size` bytes from a client; how many of them pass before an armed outage starts."""
        self.stats["bytes_up"] += size
        if self.armed is None:
            return size
        kind, seconds, left = self.armed
        if size < left:
            self.armed = (kind, seconds, left - size)
            return size
        self.armed = None
        self._start_outage(kind, seconds)
        return left

    # ---- outages -----------------------------------------------------------------------------------------
    def _cutting(self) -> bool:
        return asyncio.get_running_loop().time() < self.cut_until

    def _start_outage(self, kind: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.stats["outages"].append(
            {"kind": kind, "seconds": seconds, "at_bytes_up": self.stats["bytes_up"]}
        )
        self.cut_until = loop.time() + seconds
        for link in list(self.links):
            self.stats["reset"] += 1
            link.task.cancel()
            _reset(link.client)
            link.upstream.close()

    # ---- control -----------------------------------------------------------------------------------------
    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        words = (await reader.readline()).decode().split()
        if words[:1] == ["stats"]:
            answer: dict[str, Any] = self.stats
        elif len(words) == 3 and words[0] == "cut":
            self.armed = (words[0], float(words[1]), max(int(words[2]), 1))
            answer = {"armed": words}
        else:
            answer = {"error": f"unknown command {words!r}: cut SECONDS AFTER_BYTES, or stats"}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
        writer.close()


async def _main(host: str, port: int) -> None:
    proxy = Proxy((host, port))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    control = await asyncio.start_server(proxy.control, "127.0.0.1", 0)
    print(listener.getsockname()[1], control.sockets[0].getsockname()[1], flush=True)
    await proxy.accept_forever(listener)


@dataclass
class ProxyProcess:
    """The proxy run as its own process (so it can also be frozen by PID from outside)."""

    process: subprocess.Popen
    port: int
    control: tuple[str, int]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, host: str, port: int) -> ProxyProcess:
        process = subprocess.Popen(
            [sys.executable, __file__, host, str(port)], stdout=subprocess.PIPE, text=True
        )
        ports = process.stdout.readline().split()
        if len(ports) != 2:
            process.kill()
            raise RuntimeError(f"tcp_proxy did not start (exit {process.wait()})")
        return cls(process, int(ports[0]), ("127.0.0.1", int(ports[1])))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2])))
