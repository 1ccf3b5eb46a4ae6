"""Tests of walctl and the tools (tools/), run in-process."""
