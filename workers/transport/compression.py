"""Compressed messages are expanded only up to a bound (a compression bomb is refused)."""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import Any

from kombu import compression

from config.settings import Settings


def decompressed_limit(settings: Settings) -> int:
    """The largest body a compressed message may expand to: an inline email at its size cap,
    base64-encoded, with room to spare."""
    return 2 * settings.max_email_bytes + 1024 * 1024


def bounded_decoder(factory: Callable[[], Any], limit: int) -> Callable[[bytes], bytes]:
    def decode(data: bytes) -> bytes:
        decompressor = factory()
        body: bytes = decompressor.decompress(data, limit + 1)
        if len(body) > limit:
            raise ValueError(f"the compressed body expands to more than {limit} bytes")
        if not decompressor.eof:
            raise ValueError("the compressed body is truncated")
        return body

    return decode


def install_bounded_decompression(limit: int) -> None:
    """Kombu decompresses a message (``compression`` header) before anything else looks at it,
    entirely in memory: a small compression bomb would exhaust the worker. Its decoders are
    replaced (process-wide) by ones that stop at ``limit``; the message is then refused and
    recorded as undecodable, its compressed body kept."""
    for content_type, factory, aliases in (
        ("application/x-gzip", zlib.decompressobj, ["gzip", "zlib"]),
        ("application/x-bz2", bz2.BZ2Decompressor, ["bzip2", "bzip"]),
        ("application/x-lzma", lzma.LZMADecompressor, ["lzma", "xz"]),
    ):
        compression.register(
            compression.get_encoder(content_type)[0],
            bounded_decoder(factory, limit),
            content_type,
            aliases=aliases,
        )
    # Methods whose decoder cannot be bounded here are refused outright.
    for content_type in set(compression._decoders) - {
        "application/x-gzip",
        "application/x-bz2",
        "application/x-lzma",
    }:
        compression._decoders[content_type] = _refuse_compression(content_type)


def _refuse_compression(content_type: str) -> Callable[[bytes], bytes]:
    def decode(data: bytes) -> bytes:
        raise ValueError(f"{content_type} compression is not accepted")

    return decode
