"""``pyproxy ca`` arguments and entry point (kept apart from ca.py so that
building the command-line parser does not import cryptography)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", required=True)
    init = sub.add_parser("init", help="create a mesh CA (Istio's plug-in CA files)",
                          description="Write root-cert.pem, ca-cert.pem, ca-key.pem and cert-chain.pem "
                                      "(Istio's plug-in CA layout) into DIR.")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--trust-domain", default="cluster.local")
    init.add_argument("--key", choices=("ec", "rsa"), default="ec", help="key type (default: ec, P-256)")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA in DIR")
    issue = sub.add_parser("issue", help="issue a workload certificate (istio-agent's file-mounted layout)",
                           description="Write cert-chain.pem, key.pem and root-cert.pem for "
                                       "spiffe://TD/ns/NS/sa/SA into --out.")
    issue.add_argument("--ca", required=True, metavar="DIR", help="a directory made by `pyproxy ca init`")
    issue.add_argument("--namespace", required=True, metavar="NS")
    issue.add_argument("--service-account", required=True, metavar="SA")
    issue.add_argument("--out", required=True, metavar="DIR")
    issue.add_argument("--ttl", default="24h", help="lifetime (default: 24h, Istio's SECRET_TTL)")
    issue.add_argument("--trust-domain", default="cluster.local")
    issue.add_argument("--key", choices=("ec", "rsa"), default="ec", help="key type (default: ec, P-256)")


def main(args: argparse.Namespace) -> int:
    from cryptography import x509

    from .ca import CAError, init_ca, issue_to_dir, parse_ttl

    try:
        if args.ca_command == "init":
            init_ca(args.dir, args.trust_domain, args.key, force=args.force)
            print(f"CA written to {args.dir} (trust domain {args.trust_domain})")
            return 0
        ttl = parse_ttl(args.ttl)
        cert = issue_to_dir(args.ca, args.out, args.namespace, args.service_account,
                            args.trust_domain, ttl, args.key)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uri = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        print(f"{uri} written to {args.out} (valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)")
        return 0
    except CAError as exc:
        print(f"pyproxy ca: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pyproxy ca: {exc}", file=sys.stderr)
        return 1
