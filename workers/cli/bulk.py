"""Backfills: messages published as ``crm.batch/1`` batches, with progress and a summary.

``crm-events import cdr`` and ``crm-events import messages`` both end here: the messages go out
in batches of one kind (each message keeps its own outcome under ``<batch id>/<index>``), master
data first and one batch at a time (so that a later version of a party is applied after an
earlier one), then the rest in parallel. A progress bar shows on a terminal; the summary counts
each outcome and lists the messages that were rejected or failed, never one line per message.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

#: Kinds whose messages must be applied in the order given: sent one batch at a time, first.
ORDERED_KINDS = ("party", "target")
DEFAULT_BATCH_SIZE = 500
#: Inline email (``raw_b64``) one batch carries at most: a batch of hundreds of emails inline
#: would be a broker message of tens of megabytes, copied several times on its way (send large
#: backfills of email by reference, ``raw_ref``). A larger single email goes in a batch alone.
BATCH_INLINE_BYTES = 8 * 1024 * 1024
#: How long an import without --wait waits for each batch of parties or targets to be applied
#: before it publishes what follows.
ORDERED_WAIT_S = 600
#: Problems (rejected or failed messages) the summary lists; the JSON has them all.
SHOWN_PROBLEMS = 20


@dataclass
class Item:
    source: str
    kind: str
    message: Any
    #: Shown with the outcome (a call's id, a visit's id).
    label: str = ""
    task_id: str = ""


@dataclass
class ImportReport:
    items: list[Item]
    errors: list[dict[str, Any]]
    batches: int = 0
    outcomes: dict[str, Any] = field(default_factory=dict)
    waited: bool = False

    def rows(self, label: str = "id") -> list[dict[str, Any]]:
        rows = []
        for item in self.items:
            row: dict[str, Any] = {
                "source": item.source,
                "kind": item.kind,
                "task_id": item.task_id,
            }
            if item.label:
                row[label] = item.label
            if self.waited:
                delivery = self.outcomes.get(item.task_id)
                row["outcome"] = delivery.outcome if delivery else "pending"
                row["event_id"] = delivery.event_id if delivery else None
                row["detail"] = delivery.detail if delivery else ""
            rows.append(row)
        return rows


def batch_size(text: str) -> int:
    """Messages per ``crm.batch/1``: 1 to what a batch carries."""
    import argparse

    from models.schemas.batch import MAX_BATCH_MESSAGES
    from workers.cli.common import count

    value = count(text)
    if not 1 <= value <= MAX_BATCH_MESSAGES:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BATCH_MESSAGES}, not {value}")
    return value


def run_import(
    runtime: Any,
    items: list[Item],
    errors: list[dict[str, Any]],
    *,
    source_system: str,
    size: int,
    wait: float | None,
) -> ImportReport:
    """Publish ``items`` in batches (ordered kinds first, one at a time) and, with ``wait``,
    wait for their outcomes."""
    from workers.publish import wait_for_batches

    report = ImportReport(items, errors)
    by_kind: dict[str, list[Item]] = {}
    for item in items:
        by_kind.setdefault(item.kind, []).append(item)
    ordered = [k for k in ORDERED_KINDS if k in by_kind]
    parallel = [k for k in by_kind if k not in ORDERED_KINDS]
    chunks = [(k, chunk) for k in ordered + parallel for chunk in batches_of(by_kind[k], size)]
    told = False
    with progress_bar(len(items), wait is not None) as bar:
        published: list[Any] = []
        for position, (kind, chunk) in enumerate(chunks):
            batch = _publish(runtime, kind, chunk, source_system, bar)
            published.append(batch)
            if kind in ORDERED_KINDS and position + 1 < len(chunks):
                # What follows must not overtake this batch (a later version of a party, the
                # calls of its customers): it is applied first, by a running worker.
                if wait is None and not told:
                    print(
                        f"waiting for the {' and '.join(k + ' messages' for k in ordered)} to be "
                        f"applied before what follows them (a worker must be running; at most "
                        f"{ORDERED_WAIT_S} s a batch)",
                        file=sys.stderr,
                    )
                    told = True
                timeout = ORDERED_WAIT_S if wait is None else wait
                done = wait_for_batches(runtime.sessions, [batch], timeout, on_done=bar.processed)
                report.outcomes.update(done)
                if batch.item_ids[0] not in done:
                    print(
                        f"{kind} batch {position + 1} not applied within {timeout:g} s: what "
                        "follows it is published all the same",
                        file=sys.stderr,
                    )
        _finish(runtime, report, published, wait, bar)
    return report


def batches_of(items: list[Item], size: int) -> Iterable[list[Item]]:
    """``items`` in batches of at most ``size``, each carrying at most
    :data:`BATCH_INLINE_BYTES` of inline email (or one email that alone is more)."""
    chunk: list[Item] = []
    carried = 0
    for item in items:
        inline = item.message.get("raw_b64") if isinstance(item.message, dict) else None
        weight = len(inline) if isinstance(inline, str) else 0
        if chunk and (len(chunk) == size or carried + weight > BATCH_INLINE_BYTES):
            yield chunk
            chunk, carried = [], 0
        chunk.append(item)
        carried += weight
    if chunk:
        yield chunk


def run_stream(
    runtime: Any,
    kind: str,
    items: Iterable[Item],
    errors: list[dict[str, Any]],
    *,
    source_system: str,
    size: int,
    wait: float | None,
    total: int,
) -> ImportReport:
    """Publish messages of one kind that need no order as they are read: each batch goes out
    as soon as it is full, so the workers start on a large file while the rest of it is still
    being read. ``total`` is the most there can be (for the progress bar)."""
    report = ImportReport([], errors)
    with progress_bar(total, wait is not None) as bar:
        published: list[Any] = []
        chunk: list[Item] = []
        for item in items:
            report.items.append(item)
            chunk.append(item)
            if len(chunk) == size:
                published.append(_publish(runtime, kind, chunk, source_system, bar))
                chunk = []
        if chunk:
            published.append(_publish(runtime, kind, chunk, source_system, bar))
        _finish(runtime, report, published, wait, bar)
    return report


def _publish(runtime: Any, kind: str, chunk: list[Item], source_system: str, bar: Any) -> Any:
    """One batch of ``chunk``; each item learns the id its outcome is recorded under."""
    from workers.publish import publish_batches

    [batch] = publish_batches(
        runtime.publisher,
        kind,
        [i.message for i in chunk],
        source_system=source_system,
        size=len(chunk),
        on_published=bar.published,
    )
    for item, task_id in zip(chunk, batch.item_ids, strict=True):
        item.task_id = task_id
    return batch


def _finish(
    runtime: Any, report: ImportReport, published: list[Any], wait: float | None, bar: Any
) -> None:
    """With ``wait``, the outcome of every message not known yet."""
    from workers.publish import wait_for_batches

    report.batches = len(published)
    if wait is not None:
        rest = [b for b in published if b.item_ids[0] not in report.outcomes]
        report.outcomes.update(
            wait_for_batches(runtime.sessions, rest, wait, on_done=bar.processed)
        )
        report.waited = True


def print_report(report: ImportReport, what: str) -> int:
    """The summary on stdout and the problems on stderr; returns the exit status."""
    from workers.render import table

    rows = report.rows()
    counts = Counter(r["outcome"] for r in rows) if report.waited else Counter()
    line = f"{len(rows)} {what} published in {report.batches} batch(es)"
    if report.waited and counts:
        line += ": " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    if report.errors:
        line += f"; {len(report.errors)} not imported"
    print(line)
    problems = [r for r in rows if r.get("outcome") in ("rejected", "failed")]
    if problems:
        table(
            f"{len(problems)} rejected or failed"
            + (f" (the first {SHOWN_PROBLEMS})" if len(problems) > SHOWN_PROBLEMS else ""),
            ["source", "outcome", "detail"],
            [[r["source"], r["outcome"], r["detail"]] for r in problems[:SHOWN_PROBLEMS]],
        )
    return status_of(report, counts)


def status_of(report: ImportReport, counts: Counter[str] | None = None) -> int:
    for error in report.errors:
        print(f"{error['source']}: not imported: {error['error']}", file=sys.stderr)
    if report.waited:
        counts = counts if counts is not None else Counter(r["outcome"] for r in report.rows())
        if counts.get("pending"):
            print(f"timed out: {counts['pending']} message(s) not processed yet", file=sys.stderr)
            return 3
    return 1 if report.errors else 0


class _Bar:
    """A progress bar on a terminal's stderr; nothing elsewhere."""

    def __init__(self, total: int, waiting: bool) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.sent = self.progress.add_task("published", total=total)
        self.done = self.progress.add_task("processed", total=total) if waiting else None

    def published(self, n: int) -> None:
        self.progress.advance(self.sent, n)

    def processed(self, n: int) -> None:
        if self.done is not None:
            self.progress.advance(self.done, n)


class _NoBar:
    def published(self, n: int) -> None:
        pass

    def processed(self, n: int) -> None:
        pass


def progress_bar(total: int, waiting: bool) -> Any:
    """A progress bar on a terminal's stderr (``published``, and ``processed`` when waiting)."""
    if not sys.stderr.isatty() or total == 0:
        return nullcontext(_NoBar())
    bar = _Bar(total, waiting)

    class _Context:
        def __enter__(self) -> _Bar:
            bar.progress.start()
            return bar

        def __exit__(self, *_: Any) -> None:
            bar.progress.stop()

    return _Context()


# -- crm-events import messages FILE.jsonl ------------------------------------------------------


def messages_from_lines(data: bytes, source: str) -> tuple[list[Item], list[dict[str, Any]]]:
    """One message per line (JSON Lines): its kind read from its ``schema``; blank lines skipped,
    a line that is not a JSON object of a known schema (or not UTF-8) reported with its number.

    Lines end at a line feed, a carriage return or both, and nowhere else: JSON escapes those
    two in its strings, but not U+2028, U+2029 or U+0085, which ``str.splitlines`` would also
    break a line at. Each line is decoded on its own, so that one in another encoding is
    reported, not read with its letters replaced.
    """
    import re

    from models.jsondoc import read_json
    from models.schemas.kinds import MESSAGE_KINDS

    kinds = {kind.schema_name: name for name, kind in MESSAGE_KINDS.items()}
    items: list[Item] = []
    errors: list[dict[str, Any]] = []
    for number, line in enumerate(re.split(rb"\r\n|\r|\n", data), start=1):
        if not line.strip():
            continue
        label = f"{source}:{number}"
        try:
            message = read_json(line)
        except ValueError as exc:
            errors.append({"source": label, "line": number, "error": str(exc)})
            continue
        schema = message.get("schema") if isinstance(message, dict) else None
        kind = kinds.get(schema) if isinstance(schema, str) else None
        if kind is None:
            known = ", ".join(sorted(kinds))
            errors.append(
                {
                    "source": label,
                    "line": number,
                    "error": f"not a message of a known schema ({known}): schema {schema!r}",
                }
            )
            continue
        items.append(Item(label, kind, message))
    return items, errors


def cmd_import_messages(args: Any, runtime: Any) -> int:
    from pathlib import Path

    from workers.cli.common import InputError, emit_json

    path = Path(args.file)
    try:
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte order mark
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc
    items, errors = messages_from_lines(data, path.name)
    report = run_import(
        runtime,
        items,
        errors,
        source_system=args.source_system,
        size=args.batch_size,
        wait=args.wait,
    )
    if args.json:
        emit_json({"published": report.rows(), "errors": errors})
        return status_of(report)
    return print_report(report, "message(s)")


def register(sub: Any, add: Any) -> None:
    """Add ``import messages`` to the ``import`` group."""
    from workers.cli.common import seconds, source_system, subcommands

    imports = subcommands(sub, "import", "import data from files")
    p = imports.add_parser(
        "messages",
        help="publish a JSON Lines file of messages (calls, visits, emails, parties, targets)",
        description="One message per line, of any kind (its schema says which), published in "
        "crm.batch/1 batches: parties and targets first, one batch at a time and in file order, "
        "then the rest. For backfills; see docs/messages.md.",
    )
    p.set_defaults(handler=cmd_import_messages)
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument(
        "--source-system",
        type=source_system,
        default="import",
        help="who sent the batches (each message names its own source; default: import)",
    )
    p.add_argument(
        "--wait", type=seconds, metavar="SECONDS", help="wait until every message is processed"
    )
    p.add_argument(
        "--batch-size",
        type=batch_size,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"messages per crm.batch/1 message (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
