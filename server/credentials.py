"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, one key pair per board.

Layout of the folder it writes (existing files are kept, so the command can add boards later):

    ca.crt, ca.key            the certificate authority; ca.crt goes to every board, ca.key stays offline
                              (needed only to issue a server certificate; encrypted with the passphrase in
                              $EDGESPLIT_CA_PASSPHRASE, where set)
    server.crt, server.key    the SuperLink's TLS certificate for the addresses boards dial
    boards/<name>.key         a board's private key (OpenSSH format, NIST P-384): copy it to that board only
    boards/<name>.pub         its public key, registered with `flwr supernode register`

Each file is written to a temporary name and renamed, a key before its certificate: a crash
leaves a key without its certificate at worst, which the next run notices and makes again. The
CA is valid longer than anything it signs.

Flower wants exactly these formats: PEM certificates for TLS, and SuperNode keys as OpenSSH EC keys
on a NIST curve (``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

BOARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched whole (fullmatch): no trailing newline
CA_PASSPHRASE_ENV = "EDGESPLIT_CA_PASSPHRASE"
CA_MIN_DAYS = 3650  # the CA outlives the server certificates it signs: 10 years, or a year past --days


@dataclass(frozen=True)
class Credentials:
    """Paths of everything ``make_credentials`` wrote or found."""

    folder: Path

    @property
    def ca_certificate(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_certificate(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def board_private_key(self, board: str) -> Path:
        return self.folder / "boards" / f"{board}.key"

    def board_public_key(self, board: str) -> Path:
        return self.folder / "boards" / f"{board}.pub"


def make_credentials(folder: Path, server_hosts: list[str], boards: list[str], days: int = 825) -> Credentials:
    """Create what is missing in ``folder``: CA, server certificate for ``server_hosts``, board keys.

    An existing server certificate that does not cover ``server_hosts`` is an error rather than
    silently replaced, because boards already trust it. A key without its certificate (or public
    key) is what a crash between the two leaves: both are made again. ``ca.key`` may be absent
    (kept offline) while nothing needs signing.
    """
    if not server_hosts:
        raise ValueError("Give at least one server address the boards will dial, e.g. --server-host 192.168.1.10")
    for board in boards:
        if not BOARD_NAME.fullmatch(board):
            raise ValueError(f"Board name {board!r} must be letters, digits, '.', '_' or '-' (at most 64).")
    credentials = Credentials(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "boards").mkdir(exist_ok=True)

    if credentials.ca_key.exists() and not credentials.ca_certificate.exists():
        log.warning("%s has no certificate (an interrupted run?): making a new CA", credentials.ca_key)
        credentials.ca_key.unlink()
    if not credentials.ca_certificate.exists():
        _write_ca(credentials, max(CA_MIN_DAYS, days + 365))
    ca_cert = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())

    _complete_pair(credentials.server_key, credentials.server_certificate)
    if credentials.server_certificate.exists():
        covered = _subject_alt_names(x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes()))
        missing = sorted(set(server_hosts) - covered)
        if missing:
            raise ValueError(
                f"{credentials.server_certificate} does not cover {missing} (it covers {sorted(covered)}). "
                "Delete server.crt and server.key to issue a new one; the boards keep trusting ca.crt."
            )
    else:
        _write_server_certificate(credentials, ca_cert, _ca_key(credentials), server_hosts, days)

    for board in boards:
        _complete_pair(credentials.board_private_key(board), credentials.board_public_key(board))
        if not credentials.board_private_key(board).exists() and not credentials.board_public_key(board).exists():
            _write_board_keys(credentials, board)
    return credentials


def _complete_pair(key: Path, public: Path) -> None:
    """A key whose certificate (or public key) is missing was left by a crash between the two:
    remove it, so that the pair is made again. (A certificate without its key is the operator's
    doing: the key was moved to where it is used, and is left alone.)"""
    if key.exists() and not public.exists():
        log.warning("%s has no %s (an interrupted run?): making the pair again", key, public.name)
        key.unlink()


def _ca_key(credentials: Credentials) -> ec.EllipticCurvePrivateKey:
    """The CA's private key, to sign with; absent (kept offline) or locked is an error that says what to do."""
    if not credentials.ca_key.exists():
        raise ValueError(
            f"Issuing a server certificate needs {credentials.ca_key}, which is not here (kept offline?). "
            "Bring it back for this run, then move it off this machine again."
        )
    return _load_private_key(credentials.ca_key, os.environ.get(CA_PASSPHRASE_ENV))


def _write_ca(credentials: Credentials, days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgesplit deployment CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_secret(credentials.ca_key, _pem_private(key, os.environ.get(CA_PASSPHRASE_ENV)))
    _write_public(credentials.ca_certificate, certificate.public_bytes(serialization.Encoding.PEM))
    log.info("Wrote CA %s (keep %s offline)", credentials.ca_certificate, credentials.ca_key)


def _write_server_certificate(
    credentials: Credentials,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if now + datetime.timedelta(days=days) > ca_cert.not_valid_after_utc:
        raise ValueError(
            f"The CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before a {days}-day server certificate would: "
            "use a smaller --days, or make a new CA (and give its ca.crt to every board)."
        )
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_secret(credentials.server_key, _pem_private(key))
    _write_public(credentials.server_certificate, certificate.public_bytes(serialization.Encoding.PEM))
    log.info("Wrote server certificate %s for %s", credentials.server_certificate, ", ".join(hosts))


def _write_board_keys(credentials: Credentials, board: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_secret(credentials.board_private_key(board), private)
    _write_public(credentials.board_public_key(board), public + f" {board}\n".encode())
    log.info("Wrote key pair for board %s", board)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _subject_alt_names(certificate: x509.Certificate) -> set[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))


def _pem_private(key: ec.EllipticCurvePrivateKey, passphrase: str | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _load_private_key(path: Path, passphrase: str | None = None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(
            path.read_bytes(), password=passphrase.encode() if passphrase else None
        )
    except TypeError as error:  # encrypted without a passphrase given, or the other way round
        raise ValueError(
            f"{path} is encrypted (or not, unlike what was given): set {CA_PASSPHRASE_ENV} to its passphrase, "
            f"or unset it for a plain key ({error})."
        ) from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key; was it made by another tool?")
    return key


def _write_secret(path: Path, data: bytes) -> None:
    """Private keys are created readable by their owner only (0600) from the first byte, under a
    temporary name that is renamed when the file is whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # a leftover of an interrupted run
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate or public key, whole or not at all."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    """``edgesplit credentials``: make (or complete) a deployment's certificates and board keys."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="edgesplit credentials",
        description="Make a CA, the SuperLink's TLS certificate and one SuperNode key pair per board. "
        "Files that exist are kept, so run it again with more --boards to add boards.",
    )
    parser.add_argument("--out", type=Path, default=Path("credentials"), help="folder to write (default: credentials)")
    parser.add_argument(
        "--server-host",
        action="append",
        required=True,
        help="address the boards dial (IP or DNS name); repeat for several",
    )
    parser.add_argument("--boards", default="", help="comma-separated board names, e.g. pi-1,pi-2,jetson-1")
    parser.add_argument("--days", type=int, default=825, help="certificate validity in days")
    args = parser.parse_args(argv)
    boards = [name.strip() for name in args.boards.split(",") if name.strip()]
    try:
        credentials = make_credentials(args.out, args.server_host, boards, args.days)
    except ValueError as error:
        parser.error(str(error))
    folder = credentials.folder
    print(f"Credentials in {folder}:")
    print(f"  SuperLink:   --ssl-certfile {credentials.server_certificate} --ssl-keyfile {credentials.server_key}")
    print(f"               --ssl-ca-certfile {credentials.ca_certificate}")
    for board in boards:
        print(f"  board {board}: copy {credentials.ca_certificate} and {credentials.board_private_key(board)}")
        print(f"               register: flwr supernode register {credentials.board_public_key(board)} <connection>")
    print(f"Keep {credentials.ca_key} off the network; it is only needed to issue certificates.")
    return 0
