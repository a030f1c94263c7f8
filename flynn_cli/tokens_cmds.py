"""`flynn tokens issue|list|revoke|whoami`: principals, over flynn.v1.Principals (config service).

    flynn tokens issue alice --role operator
    flynn tokens issue telegram-bot --role channel --channel telegram
    flynn tokens list [--revoked] [--json]
    flynn tokens revoke telegram-bot --reason "token leaked"      (or --fingerprint <16 hex>)
    flynn tokens whoami

`issue` prints the token once (only its hash is kept); `revoke` ends the principal's open streams
within a second. Exit 0 on success, 1 when the mesh refused, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flynn.v1 import principals_pb2, principals_pb2_grpc
from google.protobuf import json_format

from flynn_cli import rpc
from flynn_runtime.enum_names import short_name

ROLES = {
    "operator": principals_pb2.PRINCIPAL_ROLE_OPERATOR,
    "channel": principals_pb2.PRINCIPAL_ROLE_CHANNEL,
    "agent": principals_pb2.PRINCIPAL_ROLE_AGENT,
}


def register(sub: Any) -> None:
    p = sub.add_parser("tokens", help="principals: issue, list and revoke tokens")
    cmds = p.add_subparsers(dest="tokens_cmd", metavar="<command>")
    cmds.required = True
    c = cmds.add_parser("issue", help="issue a token for a new principal (printed once)")
    c.add_argument("name", help="the principal's name (a person, a channel adapter, an agent)")
    c.add_argument("--role", choices=sorted(ROLES), required=True)
    c.add_argument(
        "--channel", action="append", default=[], help="a channel it serves (repeat; channel role)"
    )
    c.set_defaults(func=cmd_issue)
    c = cmds.add_parser("list", help="list principals (never tokens)")
    c.add_argument("--revoked", action="store_true", help="include revoked principals")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_list)
    c = cmds.add_parser("revoke", help="revoke every token of a principal (or one, by fingerprint)")
    c.add_argument("name", nargs="?", default="", help="the principal's name")
    c.add_argument("--fingerprint", default="", help="revoke only the token with this fingerprint")
    c.add_argument("--reason", default="", help="why (audited)")
    c.set_defaults(func=cmd_revoke)
    c = cmds.add_parser("whoami", help="the principal of --token / FLYNN_TOKEN")
    c.set_defaults(func=cmd_whoami)


def _stub(args: argparse.Namespace) -> principals_pb2_grpc.PrincipalsStub:
    return principals_pb2_grpc.PrincipalsStub(rpc.channel(args))


def _kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"metadata": rpc.metadata(args), "timeout": args.timeout}


def _role(role: int) -> str:
    return short_name(principals_pb2.PrincipalRole, role)


def describe(p: principals_pb2.Principal) -> str:
    scope = ""
    if p.channels:
        scope = "channels=" + ",".join(p.channels)
    elif p.methods:
        scope = f"methods={len(p.methods)}"
    flags = " REVOKED" if p.revoked else ""
    by = f" by {p.issued_by}" if p.issued_by else ""
    return f"{p.name:<24} {_role(p.role):<9} {p.fingerprint}  {p.source:<6}{by} {scope}{flags}".rstrip()


def cmd_issue(args: argparse.Namespace) -> int:
    req = principals_pb2.IssueTokenRequest(name=args.name, role=ROLES[args.role], channels=args.channel)
    resp = rpc.call(lambda: _stub(args).IssueToken(req, **_kw(args)))
    if resp is None:
        return 1
    print(describe(resp.principal))
    print(f"token: {resp.token}")
    print("(shown once: only its hash is kept)", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    req = principals_pb2.ListPrincipalsRequest(include_revoked=args.revoked)
    resp = rpc.call(lambda: _stub(args).ListPrincipals(req, **_kw(args)))
    if resp is None:
        return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(resp), indent=2))
        return 0
    for p in resp.principals:
        print(describe(p))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if bool(args.name) == bool(args.fingerprint):
        print("error: give a principal name or --fingerprint (not both)", file=sys.stderr)
        return 2
    req = principals_pb2.RevokeTokenRequest(name=args.name, fingerprint=args.fingerprint, reason=args.reason)
    resp = rpc.call(lambda: _stub(args).RevokeToken(req, **_kw(args)))
    if resp is None:
        return 1
    for p in resp.revoked:
        print(f"revoked: {describe(p)}")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    resp = rpc.call(lambda: _stub(args).WhoAmI(principals_pb2.WhoAmIRequest(), **_kw(args)))
    if resp is None:
        return 1
    print(describe(resp.principal))
    print(f"client address: {resp.client_address}")
    return 0
