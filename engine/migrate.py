import sys

from engine.store import maildir_migration as _module

sys.modules[__name__] = _module
