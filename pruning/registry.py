"""A small name -> value table that users extend: importance criteria and channel-tracer op handlers.

A registration can replace an earlier entry under the same key (a user may override a built-in); removing
it puts the earlier entry back, so a test or a library can register something for a while and leave the
table as it found it. Registrations of one key are undone in the reverse order they were made.
"""
from __future__ import annotations

from collections.abc import Hashable

__all__ = ["Registry", "Registration"]


class Registration:
    """Undoes one :meth:`Registry.register`: ``.remove()`` (idempotent) or ``with registry.register(...):``."""

    def __init__(self, registry: "Registry", key: Hashable, previous, had_previous: bool):
        self._registry = registry
        self._key = key
        self._previous = previous
        self._had_previous = had_previous
        self._active = True

    def remove(self) -> None:
        """Drop the entry, restoring the one it replaced (if any)."""
        if not self._active:
            return
        self._active = False
        if self._had_previous:
            self._registry._entries[self._key] = self._previous
        else:
            self._registry._entries.pop(self._key, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Registry:
    """Entries keyed by any hashable (a name, a torch function), in registration order."""

    def __init__(self):
        self._entries: dict = {}

    def register(self, key: Hashable, value) -> Registration:
        """Add ``value`` under ``key``, replacing (until the returned registration is removed) any earlier one."""
        had_previous = key in self._entries
        previous = self._entries.get(key)
        self._entries[key] = value
        return Registration(self, key, previous, had_previous)

    def get(self, key: Hashable, default=None):
        """The entry under ``key``, or ``default``."""
        return self._entries.get(key, default)

    def keys(self) -> list:
        """Every key, in registration order."""
        return list(self._entries)
