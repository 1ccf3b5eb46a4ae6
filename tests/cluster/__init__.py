"""Tests of a running node's roles and diverged tails (engine/cluster/)."""
