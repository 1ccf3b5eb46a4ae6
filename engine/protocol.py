from engine.replication import *  # noqa: F401,F403
from engine.replication import __all__  # noqa: F401
from engine.replication.messages import _FIELD_NAMES, _frames_envelope  # noqa: F401
