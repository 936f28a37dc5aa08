"""JSON documents as the system reads them: nested no deeper than any message of ours.

Python's JSON reader recurses once per level and raises ``RecursionError`` (not ``ValueError``)
some thousand levels down, and a document that it does read can still be too deep to be sent
on or pickled. The worker refuses such a message (``workers.transport.envelope``), the HTTP
service answers 400 and the commands that read a file of messages report it; all of them with
the reasons given here.
"""

from __future__ import annotations

import json
from typing import Any

#: Nesting deeper than any message of ours needs (an email or a visit is 4 levels deep), far
#: below the depth at which pickling the arguments for the pool process fails.
MAX_DEPTH = 32

_CONTAINERS = (dict, list, tuple)


def too_deep(value: Any) -> bool:
    """Whether ``value`` holds containers nested deeper than :data:`MAX_DEPTH`; it does not
    recurse, whatever the depth.

    Only containers are stacked: a batch of 500 calls is some 7,000 values, nearly all of
    them strings and numbers, walked for every batch the worker takes."""
    if not isinstance(value, _CONTAINERS):
        return False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, _CONTAINERS))
    return False


def read_json(data: str | bytes) -> Any:
    """The JSON document ``data`` holds; ``ValueError`` with the reason when it is not JSON (or
    not UTF-8) or is nested deeper than :data:`MAX_DEPTH` levels."""
    try:
        document = json.loads(data)
    except RecursionError:
        raise ValueError(f"the JSON is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise ValueError(f"not JSON: {exc}") from exc
    if too_deep(document):
        raise ValueError(f"the JSON is nested deeper than {MAX_DEPTH} levels")
    return document
