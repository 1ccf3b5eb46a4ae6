import sys

from engine.store import decisions as _module

sys.modules[__name__] = _module
