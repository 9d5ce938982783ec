"""The project's one error type for unusable inputs (files, folders, artifacts, URIs).

Its message is one line that names the input, what was expected and what was found, and the fix. Stages catch it and
print that line (exit 1) instead of a traceback; it is a `ValueError`, so library callers may catch either.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """An input that cannot be used: missing, malformed, or not matching its checksum or its producer's format."""
