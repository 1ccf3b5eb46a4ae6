"""A fault-injecting TCP proxy (FAULTS.md row N7), used by `walctl torture`
and by the replication fault tests.

Runs inside an anyio event loop on 127.0.0.1, in front of a target port.
Modes, switchable at any time with :meth:`FaultProxy.set_mode`:

* ``pass``: forward bytes as they come;
* ``delay``: hold each chunk ``delay_s`` before forwarding it;
* ``slice``: forward one byte per write (frames arrive in 1-byte pieces);
* ``blackhole``: accept and read, forward nothing (a hung link: the peers
  see silence, not an error) until the mode changes;
* ``refuse``: new connections are reset at once (existing ones untouched).

And one-shot faults: :meth:`cut_all` resets (RST) or closes (FIN) every
connection now; :meth:`cut_after` lets exactly N more bytes flow
target -> client and then cuts, which lands mid-frame when N is not a frame
boundary (:meth:`clear_cut_after` disarms it). :meth:`heal` returns to
``pass`` with nothing armed.

Every method that changes the proxy must run in the proxy's event loop
(from another thread: ``portal.call(proxy.set_mode, "slice")``). Nothing
here sleeps for synchronisation: callers await :meth:`wait_connections` /
:attr:`cut_event`.
"""

from __future__ import annotations

import socket
import struct

import anyio
import anyio.abc

__all__ = ["FaultProxy", "MODES"]

MODES = ("pass", "delay", "slice", "blackhole", "refuse")


class _Pair:
    def __init__(self, client: anyio.abc.SocketStream, upstream: anyio.abc.SocketStream):
        self.client = client
        self.upstream = upstream
        self.scope = anyio.CancelScope()
        self.budget: int | None = None  # bytes still allowed downstream before a cut
        self.cut_reset = True


def _reset(stream: anyio.abc.SocketStream) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER 0)."""
    try:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, anyio.TypedAttributeLookupError):
        pass


class FaultProxy:
    """See the module docstring. Start with ``port = await tg.start(proxy.serve)``."""

    def __init__(self, target_host: str, target_port: int, *, name: str = ""):
        self.name = name or f"proxy->{target_host}:{target_port}"
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay_s = 0.0
        self.pairs: set[_Pair] = set()
        self.accepted = 0
        self.cuts = 0
        self.bytes_forwarded = 0
        self.cut_event = anyio.Event()
        self._changed = anyio.Event()
        self._cut_after: tuple[int, bool] | None = None

    def retarget(self, host: str, port: int) -> None:
        """Send later connections to another address (a restarted master)."""
        self.target = (host, port)

    def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.mode = mode
        self.delay_s = delay_s
        self._notify()

    def heal(self) -> None:
        """Back to ``pass``, with no cut armed (open connections stay)."""
        self.clear_cut_after()
        self.set_mode("pass")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_connections(self, n: int) -> None:
        """Wait until ``n`` connections have been accepted in total."""
        while self.accepted < n:
            await self._changed.wait()

    def cut_all(self, *, reset: bool = True) -> None:
        """Cut every open connection now (RST if ``reset``, else FIN)."""
        for pair in list(self.pairs):
            self._cut(pair, reset)

    def cut_after(self, nbytes: int, *, reset: bool = False) -> None:
        """Let ``nbytes`` more bytes flow target -> client on each connection, then cut it."""
        self._cut_after = (nbytes, reset)
        for pair in self.pairs:
            pair.budget = nbytes
            pair.cut_reset = reset

    def clear_cut_after(self) -> None:
        """Disarm :meth:`cut_after` on every connection that has not been cut yet."""
        self._cut_after = None
        for pair in self.pairs:
            pair.budget = None

    def _cut(self, pair: _Pair, reset: bool) -> None:
        if reset:
            _reset(pair.client)
            _reset(pair.upstream)
        pair.scope.cancel()
        self.cuts += 1
        self.cut_event.set()
        self.cut_event = anyio.Event()

    def stats(self) -> dict:
        return {"name": self.name, "mode": self.mode, "accepted": self.accepted, "open": len(self.pairs),
                "cuts": self.cuts, "bytes_forwarded": self.bytes_forwarded}

    async def serve(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, anyio.create_task_group() as tg:
            port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(port)
            while True:
                try:
                    client = await listener.listeners[0].accept()
                except OSError:  # e.g. EMFILE: try again shortly rather than stop proxying
                    await anyio.sleep(0.05)
                    continue
                tg.start_soon(self._handle, client)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        self._notify()
        if self.mode == "refuse":
            _reset(client)
            await client.aclose()
            return
        try:
            with anyio.fail_after(5):
                upstream = await anyio.connect_tcp(*self.target)
        except (OSError, TimeoutError):
            _reset(client)
            await client.aclose()
            return
        pair = _Pair(client, upstream)
        if self._cut_after is not None:
            pair.budget, pair.cut_reset = self._cut_after
        self.pairs.add(pair)
        try:
            with pair.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, pair, client, upstream, False)
                    tg.start_soon(self._pump, pair, upstream, client, True)
        finally:
            self.pairs.discard(pair)
            with anyio.CancelScope(shield=True):
                for s in (client, upstream):
                    try:
                        await s.aclose()
                    except (OSError, anyio.BrokenResourceError):
                        pass

    async def _pump(self, pair: _Pair, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream,
                    downstream: bool) -> None:
        try:
            while True:
                try:
                    data = await src.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
                while self.mode == "blackhole":
                    await self._changed.wait()
                if self.mode == "delay" and self.delay_s > 0:
                    await anyio.sleep(self.delay_s)
                cut = False
                if downstream and pair.budget is not None:
                    if len(data) >= pair.budget:
                        data, cut = data[: pair.budget], True
                    pair.budget -= len(data)
                i = 0
                # Re-check the mode per byte: a slice window may end in the middle of a big chunk.
                while i < len(data) and self.mode == "slice":
                    await dst.send(data[i : i + 1])
                    i += 1
                if i < len(data):
                    await dst.send(data[i:])
                self.bytes_forwarded += len(data)
                if cut:
                    self._cut_after = None
                    self._cut(pair, pair.cut_reset)
                    return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        # One side finished: close both (like a proxy would).
        pair.scope.cancel()
