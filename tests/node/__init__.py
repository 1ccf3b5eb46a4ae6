"""Tests of a node (engine/node/)."""
