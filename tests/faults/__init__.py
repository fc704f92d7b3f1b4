"""Fault-injection tests: real processes are killed, stopped and disconnected (no mocks)."""
