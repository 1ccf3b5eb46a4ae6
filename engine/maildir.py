import sys

from engine.store import maildir as _module

sys.modules[__name__] = _module
