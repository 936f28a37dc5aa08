"""The embedded broker: kombu's filesystem transport with atomic message files.

kombu's filesystem transport creates a message file and then writes it; a consumer polling the
folder can pick the file up in between, read nothing, fail to decode it and lose the message
(seen with a visit carrying a photo). Here a message is written under a hidden temporary name
and renamed into place, which is atomic on POSIX filesystems, so a consumer only ever sees
whole messages.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    # Same signature as filesystem.Channel._put, which kombu itself declares with ``payload``
    # where its base AbstractChannel says ``message``: no override can match both.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        filename = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
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
