from engine.lmtp.server import UNKNOWN_RECIPIENT_POLICIES, LmtpConfig, LmtpServer, reply_for  # noqa: F401
from engine.runner import NodeRunner, run_node  # noqa: F401
