"""The HTTP service and who may use it: ``serve``, ``token create|list|revoke``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workers.cli.common import AddCommand, InputError, Runtime, emit_json, port


def cmd_serve(args: argparse.Namespace, rt: Runtime) -> int:
    from workers.cli.processes import require_current_schema
    from workers.gateways.http import CannotListen, serve

    require_current_schema(rt)
    try:
        return serve(rt.settings, args.host, args.port)
    except CannotListen as exc:
        raise InputError(str(exc)) from exc


def cmd_token_create(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.access import create_token

    with transaction(rt.sessions) as session:
        row, token = create_token(session, args.name, args.scope, args.staff)
        name, scope = row.name, row.scope
    if args.json:
        emit_json({"name": name, "scope": scope, "staff": args.staff, "token": token})
    else:
        print(token)
        print(
            f"token {name!r} ({scope}) created: it is shown this once, only its hash is kept",
            file=sys.stderr,
        )
    return 0


def cmd_token_list(args: argparse.Namespace, rt: Runtime) -> int:
    from tasks.access import list_tokens

    with rt.sessions() as session:
        rows = list_tokens(session)
    if args.json:
        emit_json(rows)
    else:
        from workers.render import table

        table(
            f"{len(rows)} token(s)",
            ["name", "scope", "staff", "created", "last used", "revoked"],
            [
                [
                    r["name"],
                    r["scope"],
                    r["staff"] or "",
                    r["created_at"][:16],
                    (r["last_used_at"] or "")[:16],
                    (r["revoked_at"] or "")[:16],
                ]
                for r in rows
            ],
        )
    return 0


def cmd_token_revoke(args: argparse.Namespace, rt: Runtime) -> int:
    from models.db import transaction
    from tasks.access import revoke_token

    with transaction(rt.sessions) as session:
        revoke_token(session, args.name)
    print(f"token {args.name!r} revoked: it is refused from now on", file=sys.stderr)
    return 0


def register(sub: Any, add: AddCommand) -> None:
    for name, text in (
        ("serve", "serve the HTTP API, the webhooks and the screens (DESIGN §11)"),
        ("http-gateway", "the same as serve (the name of its first version)"),
    ):
        p = add(name, cmd_serve, text)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on")
        p.add_argument("--port", type=port, default=8080, help="port (0 picks a free one)")

    tokens = sub.add_parser("token", help="tokens of the HTTP service").add_subparsers(
        dest="token_command", required=True
    )
    p = tokens.add_parser("create", help="create a token; it is printed once")
    p.set_defaults(handler=cmd_token_create)
    p.add_argument("name")
    p.add_argument("--scope", required=True, choices=["ingest", "read", "admin"])
    p.add_argument("--staff", metavar="USERNAME", help="the staff member it acts for")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p = tokens.add_parser("list", help="every token: scope, staff, last use (never the token)")
    p.set_defaults(handler=cmd_token_list)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p = tokens.add_parser("revoke", help="refuse a token from now on")
    p.set_defaults(handler=cmd_token_revoke)
    p.add_argument("name")
