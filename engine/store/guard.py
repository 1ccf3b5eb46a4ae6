"""The replica's guard against a corrupt master (MS-12).

A replica pauses a mailbox (quarantine kind ``guard``) instead of applying an
abnormal burst of destructive records: more than ``max_deletes`` mailbox
deletions, or more than ``max_expunge_ratio`` of a mailbox's messages
expunged (and at least ``min_expunged`` messages), within ``window_s``
seconds of *record time* (the master's clock written into the records, so a
replica catching up on old records judges them by when they happened).

Pure: the store feeds it events and message counts; it answers yes or no.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["GuardConfig", "Guard"]


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool = True
    window_s: int = 60
    max_deletes: int = 10
    max_expunge_ratio: float = 0.5
    min_expunged: int = 50


class Guard:
    """Sliding windows of destructive records; one instance per store."""

    def __init__(self, config: GuardConfig = GuardConfig()):
        self.config = config
        self._deletes: deque[int] = deque()
        self._expunges: dict[str, deque[tuple[int, int]]] = {}

    def _trim(self, q: deque, now_ms: int) -> None:
        cutoff = now_ms - self.config.window_s * 1000
        while q and (q[0] if isinstance(q[0], int) else q[0][0]) < cutoff:
            q.popleft()

    def check_delete(self, at_ms: int) -> str | None:
        """Count one mailbox deletion; a reason string when it must be held."""
        if not self.config.enabled:
            return None
        self._deletes.append(at_ms)
        self._trim(self._deletes, at_ms)
        if len(self._deletes) > self.config.max_deletes:
            return (f"guard: {len(self._deletes)} mailbox deletions within {self.config.window_s}s "
                    f"(limit {self.config.max_deletes})")
        return None

    def check_expunge(self, mailbox_id: str, at_ms: int, expunged: int, remaining_before: int) -> str | None:
        """Count an expunge of ``expunged`` messages from a mailbox holding
        ``remaining_before``; a reason string when it must be held."""
        if not self.config.enabled:
            return None
        q = self._expunges.setdefault(mailbox_id, deque())
        self._trim(q, at_ms)
        in_window = sum(n for _, n in q) + expunged
        base = remaining_before + sum(n for _, n in q)
        if in_window >= self.config.min_expunged and base and in_window / base > self.config.max_expunge_ratio:
            return (f"guard: {in_window} of {base} messages expunged within {self.config.window_s}s "
                    f"(limit {self.config.max_expunge_ratio:.0%})")
        q.append((at_ms, expunged))
        return None
