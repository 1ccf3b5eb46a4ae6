import sys

from engine.node import aio as _module

sys.modules[__name__] = _module
