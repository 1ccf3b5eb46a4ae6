import sys

from engine.replication import channel as _module

sys.modules[__name__] = _module
