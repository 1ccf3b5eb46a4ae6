"""Tests of the mail store (engine/store/)."""
