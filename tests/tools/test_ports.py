"""tools.ports: ports for test and demo nodes stay out of the kernel's ephemeral range."""

import random
import socket

from tools.ports import HIGH, LOW, free_port


def _ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return low, high


def test_ports_are_below_the_ephemeral_range_and_never_repeat():
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(LOW <= p < HIGH for p in ports)
    assert HIGH <= low, "the chosen band overlaps this machine's ephemeral ports"


def test_a_port_bound_by_someone_else_is_skipped():
    rng = random.Random(7)
    first = random.Random(7).randrange(LOW, HIGH)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", first))
        except OSError:
            pass  # already taken by someone else: skipped all the same
        s.listen()
        assert free_port(rng) != first
