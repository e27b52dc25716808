"""``synthnode broker lookup``: the honest broker's re-identification from the mapping file,
audited with the pseudonym and the count only, never what was found."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from node.audit import AuditTrail
from node.deid.batch import Identity, Mapping, record_mappings
from tests.nodeproc import SYNTHNODE


def _identity(pid: str, name: str, n: int) -> Identity:
    return Identity(pid, name, f"1.2.3.{n}", f"1.2.3.{n}.1", f"1.2.3.{n}.1.1", None)


def test_lookup_finds_the_patient_and_is_audited_without_them(tmp_path: Path) -> None:
    broker = tmp_path / "broker.jsonl"
    record_mappings(broker, [
        Mapping(_identity("PLANTED-PID-9", "Planted^Person", 1),
                _identity("SNAAAA", "ANONYMOUS^SNAAAA", 2)),
        Mapping(_identity("OTHER-PID-1", "Other^Person", 3),
                _identity("SNBBBB", "ANONYMOUS^SNBBBB", 4)),
    ])
    config = tmp_path / "node.toml"
    config.write_text(f'rules = []\n[deid]\nhonest_broker_file = "{broker}"\n'
                      f'[audit]\ndb = "{tmp_path / "audit.db"}"\n')

    def lookup(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SYNTHNODE, "--config", str(config), "broker", "lookup", *args],
                              capture_output=True, text=True, timeout=60)

    found = lookup("SNAAAA")
    assert found.returncode == 0, found.stderr
    assert "PLANTED-PID-9" in found.stdout and "1.2.3.1 -> 1.2.3.2" in found.stdout
    assert "OTHER-PID-1" not in found.stdout
    assert json.loads(lookup("SNAAAA", "--json").stdout)[0]["patient_name"] == "Planted^Person"
    missing = lookup("SNZZZZ")
    assert missing.returncode == 1 and "no mapping" in missing.stderr

    trail = AuditTrail(tmp_path / "audit.db")
    records = [(r.subject, r.data["count"]) for r in reversed(trail.search(event="broker"))]
    assert records == [("SNAAAA", 1), ("SNAAAA", 1), ("SNZZZZ", 0)]
    dump = json.dumps([r.as_dict() for r in trail.iter()])
    assert "PLANTED" not in dump and "Planted" not in dump and "1.2.3.1" not in dump
