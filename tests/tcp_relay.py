"""A TCP relay in a process of its own, to put a database (or anything) behind a link that can
be frozen: `SIGSTOP` stops the relay while the kernel still accepts its connections and holds
their bytes, which is what a hung (not refusing) database looks like to a client. `SIGCONT`
lets the held bytes through again.

Run it: `python -m tests.tcp_relay --target 127.0.0.1:5432 [--port 0]` prints
`listening on 127.0.0.1:PORT` once it accepts connections. In tests and benchmarks:
`with tcp_relay(5432) as relay:` then connect to `relay.port`, `relay.freeze()`,
`relay.thaw()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()


async def _serve(host: str, port: int, target_host: str, target_port: int) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        except asyncio.CancelledError:  # the relay stops: drop both sides
            client_w.close()
            server_w.close()

    server = await asyncio.start_server(handle, host, port, backlog=512)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.tcp_relay", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--target", required=True, help="HOST:PORT to relay to")
    args = p.parse_args(argv)
    target_host, _, target_port = args.target.rpartition(":")
    asyncio.run(_serve(args.host, args.port, target_host or "127.0.0.1", int(target_port)))
    return 0


@dataclass
class Relay:
    """A running relay process: connect to `port`; `freeze()` and `thaw()` it."""

    port: int
    proc: subprocess.Popen
    frozen: bool = False

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False


@contextlib.contextmanager
def tcp_relay(target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> Iterator[Relay]:
    """The relay process in front of `target_host:target_port`; thawed and stopped at exit."""
    cmd = [sys.executable, "-m", "tests.tcp_relay", "--target", f"{target_host}:{target_port}"]
    cmd += ["--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = proc.stdout.readline() if sel.select(timeout=30) else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"tcp relay did not start: {line!r}")
        relay = Relay(int(line.rsplit(":", 1)[1]), proc)
        yield relay
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
