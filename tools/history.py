import sys

from tools.torture import history as _module

sys.modules[__name__] = _module
