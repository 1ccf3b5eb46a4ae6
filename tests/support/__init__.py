"""What the tests share: paths, and the helpers of the modules beside this one.

* :mod:`.helpers`: the log's helpers (fault-injecting and crash-recording
  file layers, byte surgery, the kill -9 child) and ``assert_no_traceback``;
* :mod:`.cluster`: real ``walctl serve``/``follow`` processes;
* :mod:`.lmtp`: a node served in-process or as a ``walctl serve`` child, LMTP clients;
* :mod:`.forks`: forks made by hand, without processes;
* :mod:`.replication`: ``SessionPair`` and record makers;
* :mod:`.imap`, :mod:`.imap_node`, :mod:`.imap_abnf`: the pure IMAP session,
  the backend harnesses, the response grammar;
* :mod:`.lazyfs`, :mod:`.powerloss_child`: the power-loss file system and the
  node it runs (started as scripts).
"""

from __future__ import annotations

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")

#: Examples per long fuzz test (``--run-slow``).
LONG_FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))


def find_tests(*patterns: str) -> list[str]:
    """Paths of the test files in any folder of the suite whose names match one of the glob ``patterns``."""
    found = {p for pattern in patterns for p in glob.glob(os.path.join(TESTS, "**", pattern), recursive=True)}
    return sorted(found)
