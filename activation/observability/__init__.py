"""Metrics and logs, shared by every program."""
