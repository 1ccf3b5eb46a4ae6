"""Tests of real walctl processes and real external clients."""
