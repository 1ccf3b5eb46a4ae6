import sys

from tools.torture import faultproxy as _module

sys.modules[__name__] = _module
