"""The embedded broker: kombu's filesystem transport with atomic message files.

kombu's filesystem transport creates a message file and then writes it; a consumer polling the
folder can pick the file up in between, read nothing, fail to decode it and lose the message
(seen with a visit carrying a photo). Here a message is written under a hidden temporary name
and renamed into place, which is atomic on POSIX filesystems, so a consumer only ever sees
whole messages.

kombu reads the whole folder, sorts it and walks it from the front (``list.pop(0)``) for every
message it takes, and for every queue it finds empty: a backlog of 54,000 messages went at 0.7
a second. Here a listing is read once, split by queue in the order kombu takes them (by name:
the time the message was sent, first), and each queue's messages are taken from it; the folder
is read again when the asked queue has none left, at most every ``RELIST_S``. A message's name
begins with the time it was sent, in nanoseconds, so that the names sort in the order sent.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from queue import Empty
from time import monotonic, monotonic_ns
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)


class Channel(filesystem.Channel):
    #: A queue found empty looks at the folder again after this long at the soonest (the
    #: worker's polling interval is 0.05 s).
    RELIST_S = 0.02

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: "<queue>.msg" -> the names of its messages as last listed, in the order to take them.
        self._listed: dict[str, deque[str]] = {}
        self._listed_at = float("-inf")
        self._claim_folder: str | None = None

    def _get(self, queue: str, timeout: Any = None) -> Any:
        """The queue's next message, from the last listing while it has one for the queue.

        A message is claimed by renaming it into the processed folder (kombu moves it to the
        system's temporary folder: across filesystems that is a copy, which another consumer
        can read half-written, and a copy left behind when it fails), then read there. A file
        that is no message (not JSON, not kombu's envelope, a folder) is set aside with an
        error in the log: kombu's own read raised, and the worker stopped, at each restart."""
        wanted = f"{queue}.msg"
        while True:
            pending = self._listed.get(wanted)
            if not pending:
                if monotonic() - self._listed_at < self.RELIST_S:
                    raise Empty()
                self._relist()
                pending = self._listed.get(wanted)
                if not pending:
                    raise Empty()
            filename = pending.popleft()
            claimed = os.path.join(self._claims, filename)
            try:
                os.rename(os.path.join(self.data_folder_in, filename), claimed)
            except FileNotFoundError:
                continue  # another consumer took it meanwhile
            except OSError as exc:
                raise filesystem.ChannelError(f"Cannot take {filename!r} from queue.") from exc
            try:
                with open(claimed, "rb") as handle:
                    payload = loads(bytes_to_str(handle.read()))
                self.Message(payload, channel=self)  # what kombu makes of it, or why it cannot
            except Exception as exc:
                self._set_aside(claimed, filename, exc)
                continue
            if not self.store_processed:
                os.remove(claimed)
            return payload

    @property
    def _claims(self) -> str:
        if self._claim_folder is None:
            os.makedirs(self.processed_folder, exist_ok=True)
            self._claim_folder = str(self.processed_folder)
        return self._claim_folder

    def _set_aside(self, path: str, filename: str, exc: Exception) -> None:
        """Move a file that is no message to ``unreadable/`` beside the queue folder."""
        aside = os.path.join(os.path.dirname(os.path.normpath(self.data_folder_in)), "unreadable")
        os.makedirs(aside, exist_ok=True)
        try:
            os.rename(path, os.path.join(aside, filename))
        except OSError as move_error:
            log.error("embedded broker: %s is no message (%r) and stays in %s: %r", filename,
                      exc, path, move_error)  # fmt: skip
            return
        log.error("embedded broker: %s is no message (%s: %s); moved to %s", filename,
                  type(exc).__name__, str(exc)[:200], aside)  # fmt: skip

    def _relist(self) -> None:
        listed: dict[str, deque[str]] = {}
        for filename in sorted(os.listdir(self.data_folder_in)):
            listed.setdefault(filename.partition(".")[2], deque()).append(filename)
        self._listed = listed
        self._listed_at = monotonic()

    # Same signature as filesystem.Channel._put, which kombu itself declares with ``payload``
    # where its base AbstractChannel says ``message``: no override can match both.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # Named by the time sent, in nanoseconds and zero-padded: the names sort in the order
        # the messages were sent (kombu's milliseconds tie, and sort 9999 after 10000).
        filename = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, filename)
        # The leading dot keeps the temporary name out of every queue's pattern.
        temporary = os.path.join(self.data_folder_out, f".{filename}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temporary, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _restore(self, message: Any) -> None:
        # kombu marks the restored copy where Celery does not look; mark it where it does (as
        # kombu's Redis transport does), so the delivery counter (workers/base.py) parks a
        # message that keeps killing its worker process instead of running it forever.
        message.delivery_info["redelivered"] = True
        super()._restore(message)


class Transport(filesystem.Transport):
    Channel = Channel
