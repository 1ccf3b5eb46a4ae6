"""The fault-injecting TCP proxy for replication tests: now part of the
package (tools/torture/faultproxy.py, also used by `walctl torture`); re-exported
here so the tests keep importing it from tests.faultproxy."""

from tools.torture.faultproxy import MODES, FaultProxy

__all__ = ["FaultProxy", "MODES"]
