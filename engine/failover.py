import sys

from engine.cluster import failover as _module

sys.modules[__name__] = _module
