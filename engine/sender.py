import sys

from engine.replication import sender as _module

sys.modules[__name__] = _module
