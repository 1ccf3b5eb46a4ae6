"""Tests of reconciling diverged tails (engine/reconcile/)."""
