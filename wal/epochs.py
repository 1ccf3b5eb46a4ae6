"""The names of :mod:`wal.seek`, :mod:`wal.history` and :mod:`wal.fork` in one module, for its importers.

New code imports from those modules, or from :mod:`wal`. Every name here is
the object of its home module (``tests/test_epochs.py`` checks it).
"""

from .errors import EpochHistoryError, ForeignLogError, ForkUnknownError
from .fork import Fork, ForkSearch, find_fork, search_fork
from .history import (
    EPOCHS_FILE,
    EpochEntry,
    epoch_of,
    first_lsn_of_epoch,
    read_history,
    read_history_file,
    start_epoch,
    sync_history,
    write_history,
)
from .seek import SeekReader

__all__ = [
    "EPOCHS_FILE",
    "EpochEntry",
    "Fork",
    "ForkSearch",
    "SeekReader",
    "read_history",
    "read_history_file",
    "write_history",
    "first_lsn_of_epoch",
    "start_epoch",
    "sync_history",
    "find_fork",
    "search_fork",
    "epoch_of",
    "EpochHistoryError",
    "ForeignLogError",
    "ForkUnknownError",
]
