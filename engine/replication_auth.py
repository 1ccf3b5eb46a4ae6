import sys

from engine.replication import secret as _module

sys.modules[__name__] = _module
