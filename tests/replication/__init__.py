"""Tests of log shipping (engine/replication/) and its Promela model."""
