import sys

from engine.cluster import metrics as _module

sys.modules[__name__] = _module
