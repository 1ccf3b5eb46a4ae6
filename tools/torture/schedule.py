"""The fault schedule of a torture run: a pure function of the seed and the run's length."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

__all__ = ["FAULT_KINDS", "WARMUP_S", "Fault", "draw_schedule"]

# kind -> weight of the draws after the first round (the first round has every kind once)
FAULT_KINDS = {
    "kill-replica": 3,
    "kill-master": 2,
    "stop": 2,
    "link-cut": 2,
    "link-delay": 2,
    "link-slice": 1,
    "link-blackhole": 2,
    "partition": 1,
    "soft-failover": 3,
    "hard-failover": 3,
    "disk-full": 1,
    "fsync-error": 1,
    "write-error": 1,
    "clock-jump": 1,
}
WARMUP_S = 3.0  # deliveries only, so every mailbox exists before the first fault


@dataclass(frozen=True)
class Fault:
    """One scheduled fault. ``pick`` and ``pick2`` choose the node or link
    among those that qualify when it runs; ``param`` in [0, 1) sets the
    kind's knob (delay, byte count, clock offset...)."""

    at_s: float
    kind: str
    pick: int
    pick2: int
    duration_s: float
    param: float

    def to_dict(self) -> dict:
        return asdict(self)


def draw_schedule(seed: int, seconds: float) -> list[Fault]:
    """The fault schedule of a run: a pure function of ``seed`` and ``seconds``.

    The first faults are every kind once, in a seeded order; then kinds are
    drawn by weight. Gaps between offsets are 2-6 s, durations 1-5 s.
    """
    rng = random.Random(seed)
    deck = sorted(FAULT_KINDS)
    rng.shuffle(deck)
    kinds, weights = zip(*sorted(FAULT_KINDS.items()))
    out: list[Fault] = []
    t = WARMUP_S
    while True:
        t += rng.uniform(2.0, 6.0)
        if t >= seconds - 2.0:
            return out
        kind = deck.pop(0) if deck else rng.choices(kinds, weights)[0]
        out.append(Fault(round(t, 3), kind, rng.randrange(1 << 30), rng.randrange(1 << 30),
                         round(rng.uniform(1.0, 5.0), 3), round(rng.random(), 6)))
