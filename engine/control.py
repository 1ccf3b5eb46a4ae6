import sys

from engine.cluster import control as _module

sys.modules[__name__] = _module
