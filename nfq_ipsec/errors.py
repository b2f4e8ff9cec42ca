"""Exceptions shared by the core.

`Drop` is the only exception the packet-processing core is allowed to raise: it carries the
name of the global counter to increment (named after Linux's /proc/net/xfrm_stat where one
maps) and a human-readable reason. The pipeline turns it into a DROP verdict; any other
exception escaping a transform is a bug.
"""

from __future__ import annotations


class Drop(Exception):
    """The packet must be discarded and counted under `counter`."""

    __slots__ = ("counter", "reason")

    def __init__(self, counter: str, reason: str) -> None:
        super().__init__(f"{counter}: {reason}")
        self.counter = counter
        self.reason = reason


class ConfigError(Exception):
    """A configuration problem, naming where it is (file, key or line) and why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
