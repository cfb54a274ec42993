"""`switchyard certs`: a development CA and the certificates a stack with `tls = true` needs.

    switchyard certs --out certs --hosts gpu1.internal 10.0.0.7 --client team-a --client team-b

writes into --out (common/tls.py reads the same names):

* ca.pem, ca-key.pem: the CA (kept so a later run adds certificates signed by the same CA);
* <service>.pem, <service>-key.pem for every service (SERVICE_CERTS): server and client use, with
  localhost, 127.0.0.1, ::1, 0.0.0.0, this machine's name and --hosts as subject alternative names;
* client-<CN>.pem, client-<CN>-key.pem per --client: a client certificate with subject CN=<CN>, for
  mTLS at the front door (a tenant's `cert_subjects` names it) and tests; client-switchyard-cli is
  always made (the local CLI's certificate, recorded in stack.json);
* nats-users.json: a random password per NATS user (common/tls.py NATS_USERS), 0600.

Existing files are kept (a certificate is only written when missing, or with --force); keys are
EC P-256 (fast handshakes), written 0600. Development only: the CA key sits beside the certificates.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
import socket
import sys
from pathlib import Path

from common import tls

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def _crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: Path, days: int = 825, name: str = "Switchyard development CA") -> None:
    """A self-signed CA: out/ca.pem and out/ca-key.pem."""
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Switchyard")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca-key.pem", _key_pem(key), private=True)


def _load_ca(out: Path):
    x509, _, serialization, _, _, _ = _crypto()
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), password=None)
    return cert, key


def _san(hosts) -> list:
    x509 = _crypto()[0]
    names, seen = [], set()
    for h in hosts:
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def issue(out: Path, name: str, common_name: str, hosts=(), *, server: bool = True, days: int = 825) -> Path:
    """A certificate signed by out's CA: out/<name>.pem and out/<name>-key.pem (subject CN=common_name;
    server=True: also a server certificate for `hosts`)."""
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    ca_cert, ca_key = _load_ca(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [EKU.CLIENT_AUTH] + ([EKU.SERVER_AUTH] if server else [])
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server and hosts:
        b = b.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / f"{name}-key.pem", _key_pem(key), private=True)
    return out / f"{name}.pem"


def default_hosts(extra=()) -> list[str]:
    return [*DEFAULT_HOSTS, socket.gethostname(), *extra]


def generate(out: str | Path, hosts=(), clients=(), *, force: bool = False, days: int = 825) -> Path:
    """Everything a TLS stack needs in `out` (see the module doc); returns out. Missing files only,
    unless force (then a new CA too, and every certificate again)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if force or not (out / "ca.pem").exists() or not (out / "ca-key.pem").exists():
        make_ca(out, days)
        force = True   # a new CA: every certificate must be signed again
    all_hosts = default_hosts(hosts)
    for name in tls.SERVICE_CERTS:
        if force or not (out / f"{name}.pem").exists():
            issue(out, name, f"switchyard-{name}", all_hosts, days=days)
    for cn in dict.fromkeys([tls.CLI_CLIENT, *clients]):
        fname = tls.client_cert_name(cn)
        if force or not (out / f"{fname}.pem").exists():
            issue(out, fname, cn, server=False, days=days)
    users = out / tls.NATS_USERS_FILE
    known = json.loads(users.read_text()) if users.exists() and not force else {}
    passwords = {u: known.get(u) or secrets.token_urlsafe(24) for u in tls.NATS_USERS}
    if passwords != known:
        _write(users, json.dumps(passwords, indent=1).encode(), private=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard certs", description=(
        "Write a development CA, a certificate per service, client certificates and NATS passwords "
        "(for `tls = true` / `switchyard up --tls`). Existing files are kept unless --force."))
    ap.add_argument("--out", default="certs", help="output folder (default ./certs; config tls_dir)")
    ap.add_argument("--hosts", nargs="*", default=[], metavar="HOST",
                    help="extra DNS names / IP addresses for the service certificates "
                         f"(always: {', '.join(DEFAULT_HOSTS)} and this machine's name)")
    ap.add_argument("--client", action="append", default=[], metavar="CN",
                    help="also a client certificate with subject CN=<CN> (repeatable): client-<CN>.pem")
    ap.add_argument("--days", type=int, default=825, help="validity (default 825 days)")
    ap.add_argument("--force", action="store_true", help="a new CA and every certificate again")
    args = ap.parse_args(argv)
    for cn in args.client:
        try:
            tls.client_cert_name(cn)
        except ValueError as e:
            print(f"switchyard certs: {e}", file=sys.stderr)
            return 2
    out = generate(args.out, args.hosts, args.client, force=args.force, days=args.days)
    print(f"switchyard certs: wrote {out.resolve()} (CA ca.pem; services: {', '.join(tls.SERVICE_CERTS)}; "
          f"clients: {', '.join(dict.fromkeys([tls.CLI_CLIENT, *args.client]))}); "
          f"use it with `tls = true` and `tls_dir = \"{out.resolve()}\"`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
