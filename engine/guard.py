import sys

from engine.store import guard as _module

sys.modules[__name__] = _module
