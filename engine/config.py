import sys

from engine.cluster import config as _module

sys.modules[__name__] = _module
