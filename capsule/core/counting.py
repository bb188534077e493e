"""
The null metrics: counts nothing, answers every count.
"""

from __future__ import annotations


def _nothing(*args, **kwargs):
    return args[0] if args else None


class Uncounted:
    """
    Counts nothing: the metrics of what no server's metrics
    (L{capsule.ops.metrics}) watch (a manager, an engine built bare).  Any
    count asked of it is a no-op (one that is handed a Deferred, such as
    C{docker_call}, hands it back).
    """

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return _nothing
