"""TLS and SuperNode authentication on a loopback federation: the commands of docs/flower-tls.md.

A certificate authority signs the SuperLink's certificate; the SuperLink runs with TLS and
``--enable-supernode-auth``; the sites' public keys are registered with ``flwr supernode
register``. A registered SuperNode (started with its private key and the CA certificate, never
``--insecure``) completes a ``cmrfed flower run`` submitted over TLS; a SuperNode whose key was
never registered, and one with no key, are refused by the SuperLink and take no part.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'cmrfed[flower]'")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flower_processes import Processes, free_port, wait_for_port
from flwr.supercore.error import ApiErrorCode
from flwr.supercore.exit import ExitCode

from cmrfed import paths
from cmrfed.data.shards import load_manifest
from cmrfed.fed.flower_launch import write_connection

pytestmark = [pytest.mark.flower, pytest.mark.e2e]

TIMEOUT_S = 300.0  # generous: the machine running the suite may be busy
CONNECTION = "cmrfed"  # the SuperLink connection that write_connection writes


# --- certificates and keys, as docs/flower-tls.md's openssl and ssh-keygen commands make them -------
def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer: str, signer: ec.EllipticCurvePrivateKey, ca: bool,
                 names: list[x509.GeneralName]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_tls_certificates(folder: Path) -> dict[str, Path]:
    """A CA (ca.crt, ca.key) and a server certificate for 127.0.0.1 and localhost signed by it
    (server.pem, server.key); EC P-384 keys."""
    folder.mkdir(parents=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("cmrfed test CA", ca_key.public_key(), "cmrfed test CA", ca_key, True, [])
    server = _certificate("127.0.0.1", server_key.public_key(), "cmrfed test CA", ca_key, False,
                          [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    return {
        "ca.crt": _write_pem(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        "ca.key": _write_pem(folder / "ca.key", _private_pem(ca_key)),
        "server.pem": _write_pem(folder / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
        "server.key": _write_pem(folder / "server.key", _private_pem(server_key)),
    }


def write_supernode_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes
    and Flower reads): ``name`` (private) and ``name.pub``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write_pem(folder / name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = _write_pem(folder / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def test_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    """The server certificate verifies against the CA for 127.0.0.1 (else TLS would fail for
    the wrong reason below)."""
    certs = write_tls_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(certs["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(certs["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    private, public = write_supernode_keys(tmp_path / "keys", "site")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


# --- the federation ---------------------------------------------------------------------------------
def _register(public_key: Path, home: Path, env: dict) -> int:
    """``flwr supernode register KEY.pub cmrfed``: the node id the SuperLink gives the key."""
    done = subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION],
                          env=dict(env, FLWR_HOME=str(home)), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"SuperNode (\d+) registered", done.stdout)
    assert found, done.stdout
    return int(found.group(1))


def _site_config(client: str, prepared: Path, site_dir: Path, env: dict) -> str:
    """``cmrfed flower site-config``: the site's --node-config, as the recipe gets it."""
    done = subprocess.run([sys.executable, "-m", "cmrfed.cli", "flower", "site-config", "--client", client,
                           "--data", str(prepared), "--site-dir", str(site_dir), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def _supernode(link: str, certs: dict[str, Path], private_key: Path | None, node_config: str) -> list[str]:
    """A SuperNode over TLS (never --insecure), authenticated by ``private_key`` when given."""
    key = ["--auth-supernode-private-key", str(private_key)] if private_key else []
    return ["flower-supernode", "--superlink", link, "--root-certificates", str(certs["ca.crt"]), *key,
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config]


def _refused(processes: Processes, name: str, args: list[str], error: ApiErrorCode) -> None:
    """The SuperNode cannot connect: the SuperLink answers with ``error``, and the SuperNode logs
    Flower's connection error and exits before it ever pulls a message."""
    process, log = processes.start(name, args)
    code = process.wait(timeout=TIMEOUT_S)
    text = log.read_text()
    assert code != 0, text
    assert f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}" in text, text
    assert "Failed to initialize the connection to the SuperLink" in text, text
    assert f"[code: {error.value}]" in text, text


def test_a_registered_supernode_runs_over_tls_and_an_unregistered_one_is_refused(small_prepared, tmp_path):
    clients = list(load_manifest(small_prepared).clients)
    sites, intruder = clients[:2], clients[2]
    certs = write_tls_certificates(tmp_path / "certs")
    keys = {client: write_supernode_keys(tmp_path / "keys", client) for client in [*sites, intruder]}
    processes = Processes(tmp_path)
    port = free_port()
    link = f"127.0.0.1:{port}"
    out = tmp_path / "run-tls"
    try:
        superlink, superlink_log = processes.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(certs["ca.crt"]), "--ssl-certfile",
            str(certs["server.pem"]), "--ssl-keyfile", str(certs["server.key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)])
        wait_for_port(port, superlink, superlink_log, timeout_s=TIMEOUT_S)
        # the administrator's Flower config: one connection, over TLS
        admin = tmp_path / "admin"
        write_connection(admin, link, insecure=False, root_certificates=certs["ca.crt"])
        node_ids = {client: _register(keys[client][1], admin, processes.env) for client in sites}
        assert len(set(node_ids.values())) == len(sites)

        # a SuperNode whose key was never registered, and one without a key: both refused
        config = _site_config(intruder, small_prepared, tmp_path / f"site-{intruder}", processes.env)
        _refused(processes, f"supernode-{intruder}", _supernode(link, certs, keys[intruder][0], config),
                 ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)
        assert "No SuperNode found with the given public key" in superlink_log.read_text()
        _refused(processes, f"supernode-{intruder}-keyless", _supernode(link, certs, None, config),
                 ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED)

        # the registered SuperNodes, and a run submitted over TLS
        for client in sites:
            config = _site_config(client, small_prepared, tmp_path / f"site-{client}", processes.env)
            processes.start(f"supernode-{client}", _supernode(link, certs, keys[client][0], config))
        command = [sys.executable, "-m", "cmrfed.cli", "flower", "run", "--superlink", link,
                   "--root-certificates", str(certs["ca.crt"]), "--sites", str(len(sites)), "--data",
                   str(small_prepared), "--method", "duallora", "--rounds", "1", "--backbone", "tiny",
                   "--blocks", "1", "--rank", "4", "--node-timeout", str(int(TIMEOUT_S)), "--out", str(out)]
        run = subprocess.run(command, env=processes.env, capture_output=True, text=True,
                             timeout=2 * TIMEOUT_S, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert superlink.poll() is None
    except Exception as exc:
        raise AssertionError(f"the TLS federation failed: {exc}\n{processes.logs()}") from exc
    finally:
        processes.stop()
    info = json.loads(paths.run_config_path(out).read_text())
    assert info["result"]["completed_rounds"] == 1 and "stopped" not in info["result"]
    # the run's sites are exactly the registered keys' nodes; the intruder never took part
    assert set(info["engine"]["sites"]) == set(node_ids)  # sites are recorded by name, not node id
    assert intruder not in info["clients"]
    for client in sites:
        site_run = paths.site_run_dir(tmp_path / f"site-{client}", out.name)
        assert paths.private_tensors_path(site_run, client).exists()
    assert not (tmp_path / f"site-{intruder}").exists()  # refused before its ClientApp ever ran
