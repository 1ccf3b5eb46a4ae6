"""What happened during a torture run, as it happened."""

from __future__ import annotations

import json
import threading
import time

__all__ = ["Journal"]


class Journal:
    """The run's timestamped events (kept, and appended to ``events.jsonl`` once
    :meth:`open`), its findings (problems the harness saw itself: they become a
    verdict) and its progress lines. Times are seconds since the journal began."""

    def __init__(self, progress=None):
        self.progress = progress or (lambda text: None)
        self.t_start = time.time()
        self.events: list[dict] = []
        self.findings: list[dict] = []
        self._lock = threading.Lock()
        self._file = None

    def open(self, path: str) -> None:
        """From now on every event is also appended (and flushed) to ``path``."""
        self._file = open(path, "a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def now(self) -> float:
        return round(time.time() - self.t_start, 3)

    def event(self, kind: str, **details) -> None:
        ev = {"t": self.now(), "kind": kind, **details}
        with self._lock:
            self.events.append(ev)
            if self._file is not None:
                self._file.write(json.dumps(ev, default=str) + "\n")
                self._file.flush()

    def finding(self, problem: str, **details) -> None:
        self.findings.append({"problem": problem, "t": self.now(), **details})
        self.event("finding", problem=problem, **details)
        self.progress(f"  FINDING: {problem} {details if details else ''}")
