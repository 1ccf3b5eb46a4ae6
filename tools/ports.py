"""Listening ports for the nodes that tests, the demo and the torture harness start.

A port picked by binding port 0 lies in the kernel's ephemeral range, so between
the probe and the node's own bind any outgoing connection on the machine may be
given the same port, and the node then fails with "address already in use".
Ports here come from below the ephemeral range (the kernel never hands those to
outgoing connections), are checked free by a bind, and are never handed out twice
by one process, so two nodes started by the same caller cannot collide either.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000

_handed_out: set[int] = set()


def free_port(rng: random.Random | None = None, host: str = "127.0.0.1") -> int:
    """A TCP port in [LOW, HIGH) that is free on ``host`` now and new to this process.

    ``rng`` makes the choice reproducible (the torture harness replays a seed);
    without it the choice is random so parallel runs rarely probe the same ports.
    """
    rng = rng or random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(LOW, HIGH)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port found in {LOW}-{HIGH} on {host}")
