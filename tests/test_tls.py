"""DICOM TLS (PS3.15 Annex B) against real peers, the calling-AE binding to addresses, and what
``synthnode echo``/``send`` say when a peer is not there.

One node (module scope) listens plain and with TLS (client certificates required, signed by a
throwaway CA made with the openssl CLI), binds the title BOUND to 127.0.0.2, and forwards what
FWDSCU sends to dcmtk's storescp over TLS.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from node.archives.dimse import send_to_peer
from node.config import ConfigError, DicomDestination, NodeTLS, Settings, load_settings
from node.localorthanc import free_port
from node.tls import TLSError, server_context, tls_problems
from tests.nodeproc import SYNTHNODE, NodeProcess, dcmtk, echo, make_study, storescu, write_config

VERIFICATION = "1.2.840.10008.1.1"


def _openssl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30,
                   env=env)


def _issue(folder: Path, name: str, ca: str | None, san: str = "") -> None:
    """``name.key`` (EC P-256) and ``name.crt``: signed by ``ca`` (``ca.crt``/``ca.key``), or
    self-signed when ``ca`` is None."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key",
             cwd=folder)
    ext = folder / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   + (f"subjectAltName={san}\n" if san else ""))
    if ca is None:
        _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt",
                 "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
                 cwd=folder)
        return
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj",
             f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name,
             cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA; ``node`` (localhost, 127.0.0.1) and ``client`` certificates it signed;
    ``rogue``, self-signed; ``locked.key``, the node's key encrypted with "s3cret"."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=folder)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "2", "-subj",
             "/CN=synthnode test CA", cwd=folder)
    _issue(folder, "node", "ca", "DNS:localhost,IP:127.0.0.1")
    _issue(folder, "client", "ca", "DNS:client.example")
    _issue(folder, "rogue", None, "DNS:localhost,IP:127.0.0.1")
    _openssl("pkcs8", "-topk8", "-in", "node.key", "-out", "locked.key", "-v2", "aes256",
             "-passout", "pass:s3cret", cwd=folder)
    return folder


@pytest.fixture(scope="module")
def tls_scp(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on TLS, requiring a client certificate from the CA: (port, folder)."""
    folder = tmp_path_factory.mktemp("tls-scp")
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "+tls", str(pki / "node.key"), str(pki / "node.crt"),
         "+cf", str(pki / "ca.crt"), "-aet", "TLSSCP", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("storescp +tls did not start") from None
            time.sleep(0.1)
    yield port, folder
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def tls_node(pki: Path, tls_scp: tuple[int, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("tls-node")
    sections = {
        # Every address: in the tests' private network namespace that is loopback only, and
        # 127.0.0.2 reaches the node too (a name its certificate does not carry).
        "node": {"host": "0.0.0.0", "port": free_port(), "acse_timeout_s": 10},
        "node.tls": {"port": free_port(), "certificate": str(pki / "node.crt"),
                     "private_key": str(pki / "locked.key"), "key_password_env": "NODE_KEY_PW",
                     "ca_file": str(pki / "ca.crt"), "verify_client": True},
        "node.peers": {"BOUND": ["127.0.0.2"]},
        "spool": {"dir": str(folder / "spool"), "stable_after_s": 1, "check_interval_s": 0.2},
        "jobs": {"cpu_workers": 1, "gpu_workers": 0, "sqlite_file": str(folder / "q.sqlite3"),
                 "work_dir": str(folder / "work")},
        "dispatch": {"max_attempts": 3, "backoff_initial_s": 0.5},
    }
    rules = f"""
[[destinations]]
name = "tls-scp"
ae_title = "TLSSCP"
host = "127.0.0.1"
port = {tls_scp[0]}
tls = true

[[rules]]
name = "forward-over-tls"
destinations = ["tls-scp"]
[rules.match]
calling_aet = ["FWDSCU"]
[[rules.tasks]]
task = "forward"
"""
    cfg = write_config(folder / "node.toml", sections, rules)
    proc = NodeProcess(cfg, sections, folder / "node.log")
    os.environ["NODE_KEY_PW"] = "s3cret"  # the subprocess inherits it; the file never has it
    try:
        proc.start(timeout_s=60)
    finally:
        del os.environ["NODE_KEY_PW"]
    yield proc
    proc.stop()


def _tls_port(node: NodeProcess) -> int:
    return int(node.sections["node.tls"]["port"])


def _dcmtk_tls(pki: Path, who: str) -> list[str]:
    return ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "+cf", str(pki / "ca.crt")]


def _wait_log(node: NodeProcess, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = node.log()
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the node's log:\n{node.log()[-3000:]}")


def test_dcmtk_echo_and_store_over_tls_with_a_trusted_client_certificate(
    tls_node: NodeProcess, pki: Path, tmp_path: Path
) -> None:
    log = tls_node.log()
    assert f":{_tls_port(tls_node)} (TLS)" in log and f":{tls_node.port}," in log
    res = subprocess.run([dcmtk("echoscu"), *_dcmtk_tls(pki, "client"), "-aec", "SYNTHNODE",
                          "127.0.0.1", str(_tls_port(tls_node))],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    files = make_study(tmp_path / "study", per_series=3)
    res = storescu(_tls_port(tls_node), files, extra=_dcmtk_tls(pki, "client"))
    assert res.returncode == 0, res.stderr
    spooled = tls_node.spooled()
    for f in files:
        assert str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) in spooled
    assert echo(tls_node.port)  # the plain port beside it still answers


def test_untrusted_client_certificate_and_plain_client_are_refused_on_the_tls_port(
    tls_node: NodeProcess, pki: Path
) -> None:
    res = subprocess.run([dcmtk("echoscu"), *_dcmtk_tls(pki, "rogue"), "-aec", "SYNTHNODE",
                          "127.0.0.1", str(_tls_port(tls_node))],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    log = _wait_log(tls_node, "failed: certificate not accepted")
    assert "TLS handshake with 127.0.0.1:" in log
    # A plain DICOM client to the TLS port: refused in one line, no traceback.
    assert not echo(_tls_port(tls_node), calling="PLAINSCU")
    log = _wait_log(tls_node, "the other side does not speak TLS")
    assert "Traceback" not in log
    # A TLS client without any certificate.
    res = subprocess.run([*SYNTHNODE, "echo", f"SYNTHNODE@127.0.0.1:{_tls_port(tls_node)}",
                          "--tls", "--tls-ca", str(pki / "ca.crt"), "--timeout", "10"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "client certificate" in res.stderr, res.stderr
    _wait_log(tls_node, "the client sent no certificate")
    # ... and the port still serves a trusted client, also while a silent client holds a
    # connection open (the handshake runs in the connection's thread, not the accept loop).
    with socket.create_connection(("127.0.0.1", _tls_port(tls_node))):
        res = subprocess.run([dcmtk("echoscu"), *_dcmtk_tls(pki, "client"), "-aec",
                              "SYNTHNODE", "127.0.0.1", str(_tls_port(tls_node))],
                             capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_synthnode_echo_and_send_over_tls(tls_node: NodeProcess, pki: Path,
                                          tmp_path: Path) -> None:
    peer = f"SYNTHNODE@127.0.0.1:{_tls_port(tls_node)}"
    tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-certificate", str(pki / "client.crt"),
           "--tls-key", str(pki / "client.key")]
    res = subprocess.run([*SYNTHNODE, "echo", peer, *tls], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "success" in res.stdout and "over TLS" in res.stdout
    (path,) = make_study(tmp_path / "one", per_series=1)
    res = subprocess.run([*SYNTHNODE, "send", str(path), "--to", peer, *tls],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert str(dcmread(path).SOPInstanceUID) in tls_node.spooled()
    # The peer's certificate must name the host: the node's names 127.0.0.1, not 127.0.0.2.
    res = subprocess.run([*SYNTHNODE, "echo", f"SYNTHNODE@127.0.0.2:{_tls_port(tls_node)}",
                          *tls], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "TLS handshake with 127.0.0.2" in res.stderr and "127.0.0.2" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([*SYNTHNODE, "echo", f"SYNTHNODE@127.0.0.2:{_tls_port(tls_node)}",
                          *tls, "--tls-no-verify-hostname"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr


def test_rule_delivers_to_a_tls_peer(tls_node: NodeProcess, tls_scp: tuple[int, Path],
                                     tmp_path: Path) -> None:
    files = make_study(tmp_path / "fwd", per_series=2)
    res = storescu(tls_node.port, files, calling="FWDSCU")
    assert res.returncode == 0, res.stderr
    wanted = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    folder = tls_scp[1]
    deadline = time.monotonic() + 120
    got: set[str] = set()
    while time.monotonic() < deadline and not wanted <= got:
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in folder.iterdir() if p.is_file()}
        time.sleep(0.2)
    assert wanted <= got, tls_node.log()[-3000:]


def _associate(port: int, calling: str, bind: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title="SYNTHNODE", bind_address=(bind, 0))


def test_calling_aet_bound_to_an_address_is_refused_from_another(tls_node: NodeProcess) -> None:
    assoc = _associate(tls_node.port, "BOUND", "127.0.0.1")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)
    log = _wait_log(tls_node, "BOUND@127.0.0.1:")
    assert "calling AE title BOUND is bound in [node] peers to 127.0.0.2/32, not 127.0.0.1" in log
    assoc = _associate(tls_node.port, "BOUND", "127.0.0.2")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assoc = _associate(tls_node.port, "ANYONE", "127.0.0.1")  # titles not bound: anywhere
    assert assoc.is_established
    assoc.release()


# -- files, at start ------------------------------------------------------------------------


def test_tls_files_problems_name_the_file_and_the_fix(pki: Path, tmp_path: Path) -> None:
    def tls(**kw: object) -> NodeTLS:
        base = {"port": 2762, "certificate": pki / "node.crt", "private_key": pki / "node.key",
                "ca_file": pki / "ca.crt"}
        return NodeTLS.model_validate(base | kw)

    assert isinstance(server_context(tls(), {}), ssl.SSLContext)
    with pytest.raises(TLSError, match=r"certificate .*nothere.crt: no such file"):
        server_context(tls(certificate=tmp_path / "nothere.crt"), {})
    with pytest.raises(TLSError, match=r"client.key is not the key of certificate"):
        server_context(tls(private_key=pki / "client.key"), {})
    with pytest.raises(TLSError, match=r"locked.key is encrypted: set key_password_env"):
        server_context(tls(private_key=pki / "locked.key"), {})
    with pytest.raises(TLSError, match=r"the environment has no PW"):
        server_context(tls(private_key=pki / "locked.key", key_password_env="PW"), {})
    with pytest.raises(TLSError, match=r"cannot be decrypted: check the password in \$PW"):
        server_context(tls(private_key=pki / "locked.key", key_password_env="PW"),
                       {"PW": "no"})
    with pytest.raises(TLSError, match=r"ca_file .*node.key: not PEM CA certificates"):
        server_context(tls(ca_file=pki / "node.key"), {})
    assert server_context(tls(private_key=pki / "locked.key", key_password_env="PW"),
                          {"PW": "s3cret"})
    settings = Settings.model_validate({"destinations": [
        {"name": "p", "ae_title": "P", "host": "h", "port": 1, "tls": True,
         "tls_ca": str(tmp_path / "ca.pem")}]})
    (problem,) = tls_problems(settings, {})
    assert problem.startswith(f'destination "p" tls_ca {tmp_path / "ca.pem"}: no such file')


def test_serve_with_a_missing_certificate_stops_before_listening(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "node.toml", {
        "node": {"port": port},
        "node.tls": {"port": free_port(), "certificate": "tls/node.crt",
                     "private_key": "tls/node.key", "verify_client": False},
        "spool": {"dir": str(tmp_path / "spool")},
        "jobs": {"cpu_workers": 0, "gpu_workers": 0},
    })
    res = subprocess.run([*SYNTHNODE, "--config", str(cfg), "serve"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert f"[node.tls] certificate {tmp_path / 'tls/node.crt'}: no such file" in res.stderr
    assert "Traceback" not in res.stderr


# -- peers that are not there -------------------------------------------------------------------


def test_echo_and_send_to_a_closed_port_say_connection_refused(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    res = subprocess.run([*SYNTHNODE, "echo", f"NOBODY@127.0.0.1:{port}", "--timeout", "5"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"connection refused at 127.0.0.1:{port}: nothing listens there" in res.stderr
    assert "aborted" not in res.stderr
    (path,) = make_study(tmp_path / "one", per_series=1)
    res = subprocess.run([*SYNTHNODE, "send", str(path), "--to", f"NOBODY@127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, SYNTHNODE__DISPATCH__MAX_ATTEMPTS="1"))
    assert res.returncode == 1
    assert f"connection refused at 127.0.0.1:{port}" in res.stdout, res.stdout + res.stderr
    # A host name that does not resolve: a clear reason, not an exception.
    settings = Settings.model_validate({"dispatch": {"max_attempts": 1}})
    (result,) = send_to_peer([path], DicomDestination(
        name="x", ae_title="X", host="nowhere.invalid", port=104), settings)
    assert not result.ok
    assert "cannot resolve host nowhere.invalid" in result.reason


def test_echo_to_a_host_that_does_not_answer_gives_up_in_time() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, like a firewall.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        try:
            started = time.monotonic()
            res = subprocess.run([*SYNTHNODE, "echo", f"SILENT@127.0.0.1:{port}",
                                  "--timeout", "2"], capture_output=True, text=True, timeout=60)
            elapsed = time.monotonic() - started
        finally:
            for s in fillers:
                s.close()
    assert res.returncode == 1
    assert f"127.0.0.1:{port}" in res.stderr and "within 2 s" in res.stderr, res.stderr
    assert elapsed < 45  # bounded: the OS's own connect timeout is minutes


# -- settings ---------------------------------------------------------------------------------


def test_tls_and_peer_settings_are_checked_and_paths_resolved(tmp_path: Path) -> None:
    def problems(text: str) -> str:
        cfg = tmp_path / "node.toml"
        cfg.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(cfg, environ={})
        return str(info.value)

    tls = '[node.tls]\nport = 2762\ncertificate = "a.crt"\nprivate_key = "a.key"\n'
    assert "verify_client = true needs ca_file" in problems(tls)
    assert "[node.tls] port 2762 is also [node] port" in problems(
        '[node]\nport = 2762\n' + tls + 'verify_client = false\n')
    assert "B is bound to addresses but not in allowed_calling_aets" in problems(
        '[node]\nallowed_calling_aets = ["A"]\n[node.peers]\nB = ["10.0.0.1"]\n')
    assert 'the network is "10.1.0.0/24"' in problems('[node.peers]\nB = ["10.1.0.5/24"]\n')
    assert "host names are not accepted" in problems('[node.peers]\nB = ["pacs.example"]\n')
    peer = '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\n'
    assert "tls_ca given but tls = false" in problems(peer + 'tls_ca = "ca.crt"\n')
    assert "give tls_certificate and tls_key together" in problems(
        peer + 'tls = true\ntls_certificate = "c.crt"\n')
    assert "an Orthanc is reached over TLS by an https:// url" in problems(
        '[[destinations]]\nname = "o"\nurl = "http://x"\ntls = true\n')
    cfg = tmp_path / "ok.toml"
    cfg.write_text(tls + 'ca_file = "ca.crt"\n[node.peers]\nCT1 = ["10.0.0.5", "10.1.0.0/24"]\n'
                   + peer + 'tls = true\ntls_ca = "/etc/ca.crt"\n')
    settings = load_settings(cfg, environ={})
    assert settings.node.tls is not None
    assert settings.node.tls.certificate == tmp_path / "a.crt"
    assert settings.node.tls.ca_file == tmp_path / "ca.crt"
    assert settings.destinations[0].tls_ca == Path("/etc/ca.crt")
    assert settings.node.peers == {"CT1": ["10.0.0.5/32", "10.1.0.0/24"]}


@pytest.mark.slow
def test_backfill_by_cfind_and_cget_over_tls(pki: Path, node_factory, storescp,
                                             tmp_path: Path) -> None:
    """C-FIND and C-GET to a PACS that speaks only DICOM TLS (Orthanc with DicomTlsEnabled,
    requiring a client certificate from the CA): the node's query/retrieve SCU shows its
    certificate, checks the PACS's, and forwards what it retrieved."""
    import datetime

    from node.localorthanc import OrthancProcess
    from tests.test_jobs import all_done, wait_for

    pacs = OrthancProcess(tmp_path / "pacs", aet="TLSPACS")
    pacs.config.update({
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "node.crt"),
        "DicomTlsPrivateKey": str(pki / "node.key"),
        "DicomTlsTrustedCertificates": str(pki / "ca.crt"),
        "DicomTlsRemoteCertificateRequired": True,
    })
    study = make_study(tmp_path / "study", series=1, per_series=2)
    for path in study:
        ds = dcmread(path)
        ds.StudyDate = "20240105"
        ds.save_as(path)
    rules = f"""
[[destinations]]
name = "pacs"
ae_title = "TLSPACS"
host = "127.0.0.1"
port = {pacs.dicom_port}
tls = true
tls_ca = "{pki / 'ca.crt'}"
tls_certificate = "{pki / 'client.crt'}"
tls_key = "{pki / 'client.key'}"

[[destinations]]
name = "peer"
ae_title = "{storescp.ae_title}"
host = "127.0.0.1"
port = {storescp.port}

[[rules]]
name = "forward"
destinations = ["peer"]
[[rules.tasks]]
task = "forward"
"""
    node = node_factory(rules, spool={"stable_after_s": 0.5, "check_interval_s": 0.2},
                        jobs={"cpu_workers": 1, "gpu_workers": 0})
    pacs.config["DicomModalities"] = {"synthnode": {
        "AET": "SYNTHNODE", "Host": "127.0.0.1", "Port": node.port, "AllowFind": True,
        "AllowGet": True, "UseDicomTls": True}}
    pacs.start()
    try:
        for path in study:
            pacs.request("POST", "/instances", path.read_bytes())
        backfill = [*SYNTHNODE, "--config", str(node.config), "mirror", "backfill", "--from",
                    "pacs", "--since", datetime.date(2024, 1, 1).isoformat(), "--quiet"]
        done = subprocess.run(backfill, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 studies from pacs: 1 queued" in done.stdout, done.stdout
        wait_for(all_done(node, 1), what="the retrieved study forwarded")
        sent = {str(dcmread(p).SOPInstanceUID) for p in study}
        got = {str(dcmread(p).SOPInstanceUID) for p in storescp.received()}
        assert got == sent
        # The PACS speaks nothing but TLS: a plain association is not even possible.
        plain = AE(ae_title="SYNTHNODE")
        plain.add_requested_context("1.2.840.10008.1.1")
        assoc = plain.associate("127.0.0.1", pacs.dicom_port, ae_title="TLSPACS")
        assert not assoc.is_established
    finally:
        pacs.stop(kill=True)
