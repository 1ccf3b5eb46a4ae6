import sys

from engine.reconcile import placement as _module

sys.modules[__name__] = _module
