"""The do-nothing policy server in plain asyncio: the second baseline.

Same transport as baseline_server.c (one request per Unix-socket connection: read until LF
or EOF, write ``ACCEPT 250 2.1.5 ok``, close) written the obvious asyncio way: streams from
``asyncio.start_unix_server`` on the default event loop (no uvloop, no raw Protocol). It shows
what the Python transport alone costs per request, so the daemon's figure can be read as
"transport + policy work" against it.

Usage: python baseline_asyncio.py SOCKET_PATH   (stops on SIGTERM/SIGINT)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

REPLY = b"ACCEPT 250 2.1.5 ok\n"
# The daemon's limit on a request line; a longer one is answered anyway, like the C baseline.
MAX_LINE = 4096
BACKLOG = 1024


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        # readline() returns at LF or at EOF, which is the readsocket contract.
        await reader.readline()
        writer.write(REPLY)
        await writer.drain()
    except (ConnectionError, ValueError):
        # ValueError: a line over the stream limit; the C baseline answers those anyway,
        # but a client gone mid-request is the only case the benchmark can produce.
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket from an earlier run
    server = await asyncio.start_unix_server(handle, path, backlog=BACKLOG, limit=MAX_LINE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} SOCKET_PATH", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
