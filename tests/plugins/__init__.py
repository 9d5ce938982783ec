"""Pytest plugins of the test suite (registered by tests/conftest.py)."""
