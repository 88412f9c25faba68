"""Deployment credentials: the files Flower's SuperLink and SuperNode load, made by one command."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.verification import PolicyBuilder, Store

from common.cli import main as edgesplit
from common.flower_glue import accepts_public_key
from server.credentials import CA_PASSPHRASE_ENV, make_credentials


def test_server_certificate_verifies_against_the_ca_for_each_address(tmp_path: Path) -> None:
    credentials = make_credentials(tmp_path, ["192.168.1.10", "superlink.lan"], ["pi-1"])
    ca = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes())
    for address in ("192.168.1.10", "superlink.lan"):
        subject = x509.IPAddress(ipaddress.ip_address(address)) if address[0].isdigit() else x509.DNSName(address)
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
        verifier.verify(server, [])  # raises if the chain or the name does not check out
    other = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("elsewhere.lan"))
    with pytest.raises(x509.verification.VerificationError):
        other.verify(server, [])


def test_board_keys_are_what_flower_loads_and_private_files_are_owner_only(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    credentials = make_credentials(tmp_path, ["127.0.0.1"], ["pi-1", "jetson-1"])
    for board in ("pi-1", "jetson-1"):
        private = load_ssh_private_key(credentials.board_private_key(board).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert accepts_public_key(credentials.board_public_key(board))  # `flwr supernode register` accepts it
    for secret in (credentials.ca_key, credentials.server_key, credentials.board_private_key("pi-1")):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_running_again_adds_boards_and_keeps_what_exists(tmp_path: Path) -> None:
    first = make_credentials(tmp_path, ["127.0.0.1"], ["pi-1"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    make_credentials(tmp_path, ["127.0.0.1"], ["pi-1", "pi-2"])
    assert all(path.read_bytes() == data for path, data in before.items())
    assert first.board_private_key("pi-2").exists()


def test_mistakes_get_errors_that_say_what_to_do(tmp_path: Path) -> None:
    make_credentials(tmp_path, ["127.0.0.1"], [])
    with pytest.raises(ValueError, match=r"does not cover \['10.0.0.9'\].*Delete server.crt"):
        make_credentials(tmp_path, ["10.0.0.9"], [])
    with pytest.raises(ValueError, match="Board name"):
        make_credentials(tmp_path, ["127.0.0.1"], ["../escape"])
    with pytest.raises(ValueError, match="at least one server address"):
        make_credentials(tmp_path / "other", [], ["pi-1"])
    with pytest.raises(ValueError, match="Board name"):
        make_credentials(tmp_path, ["127.0.0.1"], ["pi-1\n"])  # matched whole: no trailing newline
    offline = tmp_path / "ca.key.offline"
    (tmp_path / "ca.key").rename(offline)  # kept offline: boards can still be added
    make_credentials(tmp_path, ["127.0.0.1"], ["pi-9"])
    (tmp_path / "server.crt").unlink()
    (tmp_path / "server.key").unlink()
    with pytest.raises(ValueError, match=r"needs .*ca\.key.*kept offline"):
        make_credentials(tmp_path, ["127.0.0.1"], [])


def test_a_crash_between_a_key_and_its_certificate_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server import credentials as module

    real = module._write_public

    def crash_on_the_server_certificate(path: Path, data: bytes) -> None:
        if path.name == "server.crt":
            raise KeyboardInterrupt("power cut")
        real(path, data)

    monkeypatch.setattr(module, "_write_public", crash_on_the_server_certificate)
    with pytest.raises(KeyboardInterrupt):
        make_credentials(tmp_path, ["127.0.0.1"], ["pi-1"])
    assert (tmp_path / "server.key").exists() and not (tmp_path / "server.crt").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half written under its own name
    monkeypatch.setattr(module, "_write_public", real)
    credentials = make_credentials(tmp_path, ["127.0.0.1"], ["pi-1"])  # today: FileExistsError
    server = x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes())
    key = load_pem_private_key(credentials.server_key.read_bytes(), None)
    assert server.public_key() == key.public_key()  # the pair belongs together
    make_credentials(tmp_path / "fresh", ["127.0.0.1"], [])  # a CA key without its certificate: made again
    (tmp_path / "fresh" / "ca.crt").unlink()
    (tmp_path / "fresh" / "server.crt").unlink()
    (tmp_path / "fresh" / "server.key").unlink()
    again = make_credentials(tmp_path / "fresh", ["127.0.0.1"], [])
    ca = x509.load_pem_x509_certificate(again.ca_certificate.read_bytes())
    assert ca.public_key() == load_pem_private_key(again.ca_key.read_bytes(), None).public_key()


def test_the_ca_outlives_what_it_signs_and_its_key_can_be_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CA_PASSPHRASE_ENV, "correct horse")
    credentials = make_credentials(tmp_path, ["127.0.0.1"], [], days=825)
    ca = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes())
    assert ca.not_valid_after_utc > server.not_valid_after_utc
    assert b"ENCRYPTED" in credentials.ca_key.read_bytes()
    with pytest.raises(TypeError):
        load_pem_private_key(credentials.ca_key.read_bytes(), None)
    credentials.server_certificate.unlink()
    credentials.server_key.unlink()
    with pytest.raises(ValueError, match="expires on"):
        make_credentials(tmp_path, ["127.0.0.1"], [], days=40_000)
    monkeypatch.delenv(CA_PASSPHRASE_ENV)
    with pytest.raises(ValueError, match=CA_PASSPHRASE_ENV):
        make_credentials(tmp_path, ["127.0.0.1"], [])


def test_the_edgesplit_command_makes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = edgesplit(["credentials", "--out", str(tmp_path), "--server-host", "10.1.2.3", "--boards", "a,b"])
    assert code == 0
    assert {p.name for p in (tmp_path / "boards").iterdir()} == {"a.key", "a.pub", "b.key", "b.pub"}
    assert "flwr supernode register" in capsys.readouterr().out
    assert edgesplit(["no-such-command"]) == 2
