import sys

from engine.replication import tail as _module

sys.modules[__name__] = _module
