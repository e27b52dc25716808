"""The operator console over HTTP, against a real ``synthnode serve`` with a worker: roles,
sessions, CSRF, the trusted proxy header, a study that arrives by storescu, the review and
quarantine pages, and a byte scan of every page served for the planted patient data."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from node.audit import AuditTrail
from node.config import load_settings
from node.jobs import JobState
from tests.console import PASSWORDS, REVIEWED, Client, console_node, console_url
from tests.nodeproc import SYNTHNODE, NodeProcess, storescu
from tests.phi_corpus import PlantedStudy, make_planted_sr, make_planted_study
from tests.test_jobs import records, wait_for

pytestmark = pytest.mark.slow

PAGES = ["/", "/studies", "/jobs", "/quarantine", "/review", "/models", "/audit", "/users"]
ALLOWED = {"viewer": {"/", "/studies", "/jobs", "/quarantine", "/models"},
           "reviewer": {"/", "/studies", "/jobs", "/quarantine", "/models", "/review",
                        "/audit"},
           "admin": set(PAGES)}
_UID = re.compile(rb"[0-9]+(?:\.[0-9]+){3,}")


def _node(node_factory: Any, tmp_path: Path, **over: dict[str, Any]) -> NodeProcess:
    return console_node(node_factory, tmp_path, REVIEWED, **over)


def leaks(pages: list[str], *studies: PlantedStudy) -> list[str]:
    """Planted values (names, IDs, accession numbers, free text, dates) found in any page.
    UIDs are not patient data here: pages show them by design."""
    blob = "\n".join(pages).encode()
    found = [p.where for s in studies for p in s.planted
             if not p.where.startswith("UID") and p.value.encode() in blob]
    without_uids = _UID.sub(b"", blob)
    found += [f"date {d}" for s in studies for d in s.dates if d.encode() in without_uids]
    return found


@pytest.fixture
def held_and_quarantined(node_factory, tmp_path: Path):
    """A node whose planted study is held for review and whose planted SR is quarantined."""
    node = _node(node_factory, tmp_path)
    study = make_planted_study(tmp_path / "in", n_series=1, per_series=2, seed=5)
    sr = make_planted_sr(tmp_path / "in" / "sr", study=study, seed=5)
    assert storescu(node.port, study.files + sr.files).returncode == 0
    wait_for(lambda: [j for j in records(node) if j.state is JobState.REVIEW],
             what="the job held for review")
    return node, study, sr


def test_pages_by_role_images_only_where_allowed_and_no_patient_data(
    held_and_quarantined: tuple[NodeProcess, PlantedStudy, PlantedStudy],
) -> None:
    node, study, sr = held_and_quarantined
    base = console_url(node)
    seen: list[str] = []
    (job,) = records(node)

    anonymous = Client(base, seen)
    for path in PAGES:
        r = anonymous.get(path, allow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path

    clients = {}
    for name, role in (("victor", "viewer"), ("rita", "reviewer"), ("ada", "admin")):
        c = clients[role] = Client(base, seen)
        assert c.login(name).url.rstrip("/") == base
        for path in PAGES:
            r = c.get(path)
            assert r.status_code == (200 if path in ALLOWED[role] else 403), (role, path)

    viewer, reviewer, admin = clients["viewer"], clients["reviewer"], clients["admin"]
    # the study arrived and shows; the SR's de-identification quarantined it
    assert study.study_uid in viewer.get("/studies").text
    assert "structured report with free text" in viewer.get("/quarantine").text
    assert job.id in viewer.get("/jobs").text
    assert JobState.REVIEW.value in viewer.get(f"/jobs/{job.id}").text

    # images: quarantine for admins only, review outputs for reviewers and admins
    quarantine_page = viewer.get("/quarantine").text
    assert "<img" not in quarantine_page
    admin_page = admin.get("/quarantine").text
    (image,) = re.findall(r'src="(/quarantine/image/[^"]+\.png)"', admin_page)
    assert viewer.get(image).status_code == 403
    assert reviewer.get(image).status_code == 403
    got = admin.get(image)
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    thumbs = re.findall(r'src="(/review/[^"]+\.png)"', reviewer.get("/review").text)
    assert len(thumbs) == 2
    assert viewer.get(thumbs[0]).status_code == 403
    assert reviewer.get(thumbs[0]).content.startswith(b"\x89PNG")

    # a reviewer cannot manage users, even with a valid CSRF token
    token = reviewer.csrf("/review")
    r = reviewer.post("/users", {"action": "add", "name": "mallory", "role": "admin",
                                 "password": "x" * 16, "csrf": token})
    assert r.status_code == 403
    r = reviewer.post("/users", {"action": "role", "name": "rita", "role": "admin",
                                 "csrf": token})
    assert r.status_code == 403

    # posts without the CSRF token, or with another session's, change nothing
    for form in ({}, {"csrf": "forged"}, {"csrf": token}):
        r = admin.post("/users", {"action": "add", "name": "mallory", "role": "admin",
                                  "password": "x" * 16, **form})
        assert r.status_code == 403, form
        r = reviewer.post("/review/decide", {"target": job.id, "decision": "approve",
                                             **({} if form.get("csrf") == token else form)})
        assert r.status_code == 403, form
    listed = subprocess.run([*SYNTHNODE, "--config", str(node.config), "user", "list"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert "mallory" not in listed.stdout and "rita" in listed.stdout
    assert records(node)[0].state is JobState.REVIEW

    # the job's header summary on the review page shows the outputs' values only
    review_page = reviewer.get("/review").text
    assert "PatientName" in review_page and "replaced" in review_page

    leaked = leaks(seen, study, sr)
    assert not leaked, leaked
    assert not leaks([node.log()], study, sr)


def test_login_failures_are_slowed_and_audited_and_logout_ends_the_session(
    node_factory, tmp_path: Path
) -> None:
    node = _node(node_factory, tmp_path, jobs={"cpu_workers": 0})
    base = console_url(node)
    c = Client(base, [])
    started = time.monotonic()
    r = c.login("ada", "not-the-password")
    assert time.monotonic() - started >= 0.9
    assert "error=1" in r.url and "Wrong user name or password" in r.text
    assert c.get("/", allow_redirects=False).status_code == 303
    assert c.login("nobody", "whatever-password").url.endswith("error=1&next=/")

    c.login("ada")
    assert c.get("/users").status_code == 200
    cookie = c.http.cookies.get("synthnode_session")
    assert cookie
    assert c.post("/logout", {"csrf": c.csrf()}).url.endswith("/login")
    replay = Client(base, [])
    replay.http.cookies.set("synthnode_session", cookie)
    assert replay.get("/", allow_redirects=False).status_code == 303

    trail = AuditTrail(load_settings(node.config, environ={}).audit.db)
    logins = [(r.actor, r.data.get("ok"), r.data.get("action")) for r in
              reversed(trail.search(event="login"))]
    assert logins == [("ada", False, None), ("(unknown user)", False, None), ("ada", True, None),
                      ("ada", None, "logout")]
    assert PASSWORDS["ada"] not in "".join(str(r.as_dict()) for r in trail.iter())


SECRET = "proxy-secret-0123456789abcdef"


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_trusted_header_only_from_trusted_proxies_with_their_secret(
    node_factory, tmp_path: Path, trusted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNTHNODE_TEST_PROXY_SECRET", SECRET)  # (the node inherits it)
    proxies = ["127.0.0.1"] if trusted else ["192.0.2.10"]
    node = _node(node_factory, tmp_path, jobs={"cpu_workers": 0},
                 console={"trusted_user_header": "X-Remote-User", "trusted_proxies": proxies,
                          "trusted_proxy_secret_env": "SYNTHNODE_TEST_PROXY_SECRET"})
    proxy = {"X-Synthnode-Proxy-Secret": SECRET}
    c = Client(console_url(node), [])
    r = c.get("/users", headers={"X-Remote-User": "ada", **proxy}, allow_redirects=False)
    if not trusted:
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        return
    assert r.status_code == 200 and "ada (admin)" in r.text
    # the proxy's user gets a session, and CSRF protection with it
    assert c.http.cookies.get("synthnode_session")
    r = c.post("/users", {"action": "add", "name": "mallory", "role": "admin",
                          "password": "x" * 16}, headers={"X-Remote-User": "ada", **proxy})
    assert r.status_code == 403
    # from a trusted address but without the proxy's secret (any local process), or with a
    # wrong one: nobody
    for forged in ({}, {"X-Synthnode-Proxy-Secret": SECRET[:-1] + "X"},
                   {"X-Synthnode-Proxy-Secret": ""}):
        fresh = Client(console_url(node), [])
        r = fresh.get("/users", headers={"X-Remote-User": "ada", **forged},
                      allow_redirects=False)
        assert r.status_code == 303 and not fresh.http.cookies.get("synthnode_session"), forged
    # an unknown name is nobody; another name than the session's ends the session's use
    fresh = Client(console_url(node), [])
    r = fresh.get("/", headers={"X-Remote-User": "eve", **proxy}, allow_redirects=False)
    assert r.status_code == 303
    r = c.get("/users", headers={"X-Remote-User": "victor", **proxy})
    assert r.status_code == 403  # now victor (a viewer), not ada's session


def test_a_proxy_header_without_its_secret_does_not_start(tmp_path: Path) -> None:
    """trusted_user_header without trusted_proxy_secret_env is a config error; with the
    variable unset or short, serve refuses to start, naming it."""
    from node.config import ConsoleSettings
    from node.console.auth import UserError, proxy_secret

    with pytest.raises(ValueError, match="needs trusted_proxy_secret_env"):
        ConsoleSettings(trusted_user_header="X-Remote-User")
    s = ConsoleSettings(trusted_user_header="X-Remote-User",
                        trusted_proxy_secret_env="PROXY_SECRET")
    for env in ({}, {"PROXY_SECRET": "short"}):
        with pytest.raises(UserError, match="PROXY_SECRET"):
            proxy_secret(s, env)
    assert proxy_secret(s, {"PROXY_SECRET": SECRET}) == SECRET
    assert proxy_secret(ConsoleSettings(), {}) == ""
