import sys

from engine.store import errors as _module

sys.modules[__name__] = _module
