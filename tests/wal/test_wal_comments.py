"""wal/'s comments and docstrings say what is true now (the history is in the commit log).

Each pattern is a way history creeps into code text: issue numbers, the code
as it was, bug stories from a test run.
"""

import os
import re
from tests.support import ROOT


HISTORY = re.compile(
    r"\(issue\s*#?\d+\)|\bissue\s*#\d+|\bthe old (code|version|writer|reader)\b|\bused to\b|\bno longer\b"
    r"|\bpreviously\b|\btorture seed\b|\bthis session\b|\blast session\b|\bwas a bug\b",
    re.IGNORECASE,
)


def test_wal_text_carries_no_history():
    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, "wal"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "wal", name), encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if HISTORY.search(line):
                        found.append(f"wal/{name}:{number}: {line.strip()}")
    assert found == []


def test_the_pattern_catches_history():
    for text in ("# fixed in (issue 5)", "# the old code stopped here", "# walctl torture seed 42 found it"):
        assert HISTORY.search(text), text
