"""STOW-RS benchmark: synthnode's STOW-RS ingest next to Orthanc's DICOMweb plugin, same files.

What is measured
    The wall clock of uploading N small instances (CT_small copies, ~39 kB, one study) as
    multipart/related requests of ``--per-request`` instances each, one after another on one
    HTTP connection (requests.Session) over loopback, until the last answer; every answer must
    report every instance stored. Rates are N / seconds.

Receivers, each started fresh with empty storage for every run
    node     ``synthnode serve`` (console on, no rules, no workers; spool ``fsync = true``:
             every part is fdatasync'ed and indexed before the answer), HTTP Basic as an admin
    orthanc  Orthanc 1.10 with Debian's orthanc-dicomweb plugin (``SyncStorageArea`` true), no
             authentication

Interleaved ``--repeat`` times, medians. Goal: node >= 1.0x Orthanc.

Usage (as root): .venv/bin/python bench/stow.py [--small N] [--per-request K] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests
from console import PASSWORD, add_admin, login
from harness import (
    OUT_DIR,
    BenchError,
    NodeOptions,
    NodeServer,
    add_out_option,
    environment,
    goal_state,
    launch_orthanc,
    run_main,
    settle_or_warn,
    stop_orthanc,
)

from node.localorthanc import OrthancProcess, free_port
from node.samples import make_study

BOUNDARY = "synthnode-bench-boundary"


def bodies(files: list[Path], per_request: int) -> list[bytes]:
    out = []
    for i in range(0, len(files), per_request):
        chunks = []
        for path in files[i:i + per_request]:
            chunks += [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                       path.read_bytes(), b"\r\n"]
        chunks.append(f"--{BOUNDARY}--\r\n".encode())
        out.append(b"".join(chunks))
    return out


def upload(session: requests.Session, url: str, requests_: list[bytes], per: list[int]) -> float:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                               f"boundary={BOUNDARY}", "Accept": "application/dicom+json"}
    started = time.monotonic()
    for body, n in zip(requests_, per, strict=True):
        r = session.post(url, data=body, headers=headers, timeout=600)
        if r.status_code != 200:
            raise BenchError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
        stored = r.json().get("00081199", {}).get("Value", [])
        if len(stored) != n:
            raise BenchError(f"{url}: {len(stored)} of {n} stored")
    return time.monotonic() - started


def run_node(root: Path, rep: int, reqs: list[bytes], per: list[int]) -> float:
    work = root / f"node-{rep}"
    work.mkdir(parents=True)
    node = NodeServer(work, NodeOptions(console_port=free_port()))
    add_admin(node)
    node.prepare = lambda: None  # type: ignore[method-assign]
    node.start()
    try:
        port = node.options.console_port
        session = login(port)  # (waits for the console)
        session.auth = ("bench", PASSWORD)
        session.cookies.clear()  # Basic, as a STOW client
        settle_or_warn(10)
        return upload(session, f"http://127.0.0.1:{port}/dicomweb/studies", reqs, per)
    finally:
        node.stop()


def run_orthanc(root: Path, rep: int, reqs: list[bytes], per: list[int]) -> float:
    work = root / f"orthanc-{rep}"
    work.mkdir(parents=True)
    orthanc = OrthancProcess(work, username=None, dicomweb=True,
                             overrides={"Name": "synthnode-bench"})
    launch_orthanc(orthanc)
    try:
        settle_or_warn(10)
        return upload(requests.Session(), orthanc.dicomweb_url + "/studies", reqs, per)
    finally:
        stop_orthanc(orthanc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--per-request", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    add_out_option(parser, OUT_DIR / "stow.json")
    args = parser.parse_args()

    def body(root: Path) -> None:
        files = make_study(root / "data", "CT_small.dcm", per_series=args.small)
        reqs = bodies(files, args.per_request)
        per = [min(args.per_request, len(files) - i)
               for i in range(0, len(files), args.per_request)]
        runs: dict[str, list[float]] = {"node": [], "orthanc": []}
        for rep in range(args.repeat):
            runs["node"].append(run_node(root, rep, reqs, per))
            runs["orthanc"].append(run_orthanc(root, rep, reqs, per))
        rates = {k: len(files) / statistics.median(v) for k, v in runs.items()}
        ratio = rates["node"] / rates["orthanc"]
        print(f"STOW-RS, {len(files)} small instances in requests of {args.per_request}, "
              f"median of {args.repeat}: node {rates['node']:.0f} inst/s, Orthanc DICOMweb "
              f"{rates['orthanc']:.0f} inst/s: {ratio:.2f}x (goal >= 1.0x: "
              f"{goal_state(ratio >= 1.0)})")
        result: dict[str, Any] = {"environment": environment("fastapi", "uvicorn",
                                                             orthanc_version=True),
                                  "runs_s": runs, "rates": rates, "ratio": ratio}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    return run_main("bench/stow.py", body, tmp_prefix="synthnode-bench-stow-")


if __name__ == "__main__":
    sys.exit(main())
