"""The console in a real headless Chromium (Debian's chromium + chromium-driver, selenium,
offline), against a real ``synthnode serve`` with a worker and a real Orthanc: a reviewer logs
in, sees the study arrive, opens the review page and approves, and the outputs appear in
Orthanc; a viewer cannot see quarantined images; a reviewer cannot reach the users page; a
post without the CSRF token is refused. Every page the browser showed is byte-scanned for the
planted patient data.

``SYNTHNODE_SCREENSHOTS=docs`` writes the README's screenshots there."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import requests

from node.jobs import JobState
from node.localorthanc import OrthancProcess
from tests import browser
from tests.console import PASSWORDS, REVIEWED, console_node, console_url
from tests.nodeproc import storescu
from tests.phi_corpus import make_planted_sr, make_planted_study
from tests.test_console import leaks
from tests.test_jobs import records, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not browser.available(), reason="no chromium/chromedriver")]


def login(b: browser.Browser, name: str) -> None:
    b.get("/login")
    b.by_id("login-user").send_keys(name)
    b.by_id("login-password").send_keys(PASSWORDS[name])
    b.submit("login-submit")
    assert b.has_id("whoami"), b.driver.page_source[:500]


def logout(b: browser.Browser) -> None:
    b.submit("logout")
    assert b.has_id("login-user")


def test_reviewer_approves_in_the_browser_and_the_study_reaches_orthanc(
    node_factory, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    node = console_node(node_factory, tmp_path, REVIEWED, orthanc)
    base = console_url(node)
    shots = Path(os.environ.get("SYNTHNODE_SCREENSHOTS", tmp_path / "shots"))

    study = make_planted_study(tmp_path / "in", n_series=2, per_series=2, seed=21)
    sr = make_planted_sr(tmp_path / "in" / "sr", study=study, seed=21)
    b = browser.Browser(base)
    try:
        login(b, "rita")
        b.get("/studies")
        assert study.study_uid not in b.driver.page_source
        assert storescu(node.port, study.files + sr.files).returncode == 0
        b.wait_for("/studies", lambda html: study.study_uid in html, 60, "the study")
        job = wait_for(lambda: next((j for j in records(node)
                                     if j.state is JobState.REVIEW), None),
                       what="the job held for review")
        b.wait_for("/review", lambda html: f'id="approve-{job.id}"' in html, 30,
                   "the held job on the review page")
        assert len(b.css(f"#held-{job.id} .thumbs img.thumb")) == 4
        assert len(b.css(f"#series-{job.id} img.thumb")) == 4  # two per source series
        assert orthanc.get_json("/instances") == []
        b.get("/")
        b.screenshot(shots / "console-overview.png")
        b.get("/review")
        b.screenshot(shots / "console-review.png")

        # a post without the CSRF token, with the browser's own session, is refused
        cookie = b.cookie("synthnode_session")
        assert cookie
        forged = requests.post(f"{base}/review/decide", data={"target": job.id,
                               "decision": "approve"}, cookies={"synthnode_session": cookie},
                               timeout=30)
        assert forged.status_code == 403 and "CSRF" in forged.text
        assert records(node)[0].state is JobState.REVIEW

        # one series rejected on its own (with its reason); the job stays held
        b.by_id(f"reason-{job.id}-2").send_keys("burned-in label")
        assert "series rejected; 1 job(s) wait for their other series" in b.submit(
            f"reject-{job.id}-2")
        assert "rejected by rita" in b.driver.page_source
        assert records(node)[0].state is JobState.REVIEW
        # then the job as a whole: its other series is delivered, the rejected one never
        b.by_id(f"reason-{job.id}").send_keys("looked at every image")
        assert "1 job(s) approved" in b.submit(f"approve-{job.id}")
        wait_for(lambda: len(orthanc.get_json("/instances")) == 2, what="the outputs in Orthanc")
        b.wait_for(f"/jobs/{job.id}", lambda html: 'id="job-state">done<' in html, 60,
                   "the job done")
        assert "approved by rita" in b.driver.page_source
        assert "rejected by rita" in b.driver.page_source
        time.sleep(1.0)  # the rejected series would have followed by now
        assert len(orthanc.get_json("/instances")) == 2

        # a reviewer cannot open the users page
        b.get("/users")
        assert "this needs the admin role" in b.driver.page_source
        assert not b.has_id("add-user")
        logout(b)

        # a viewer sees the quarantine's reasons, never its images
        login(b, "victor")
        html = b.get("/quarantine")
        assert "structured report with free text" in html
        assert not b.css("img")
        assert not b.has_id("nav-review") and not b.has_id("nav-users")
        logout(b)
        login(b, "ada")
        html = b.get("/quarantine")
        (image,) = re.findall(r'src="(/quarantine/image/[^"]+\.png)"', html)
        assert b.css("img.thumb")
        logout(b)
        login(b, "victor")
        b.get(image)
        assert "this needs the admin role" in b.driver.page_source
    finally:
        b.close()
    leaked = leaks(list(b.pages.values()), study, sr)
    assert not leaked, leaked
