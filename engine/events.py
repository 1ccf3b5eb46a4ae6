import sys

from engine.store import events as _module

sys.modules[__name__] = _module
