import sys

from engine.replication import receiver as _module

sys.modules[__name__] = _module
