"""De-identifying a job's sources: a worker's warm de-identifiers, the outputs they write, and
the honest-broker records of what became what.

The job stage hands in how a source is read, whether it is the node's own output and whether
there is disk space for the next output; what those raise passes through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from node import metrics
from node.archives.outgoing import Made
from node.config import DeidOption, DeidSettings
from node.deid.batch import Identity, Mapping, deidentify_to_file, record_mappings
from node.deid.engine import Deidentifier, Quarantined
from node.files import atomic_write
from node.uids import is_valid_uid

log = logging.getLogger(__name__)


class Deidentifiers:
    """A worker's de-identifiers, one per set of options, kept warm from job to job."""

    def __init__(self, deid: DeidSettings, build: Callable[[DeidSettings], Deidentifier],
                 quarantine_dir: Path | None = None) -> None:
        """``build`` makes a de-identifier for its settings (with the inpainting hook where a
        pixel rule fills with generated anatomy); it is called once per set of options.
        ``quarantine_dir``: where quarantined sources are kept (None: not kept)."""
        self.settings = deid
        self.quarantine_dir = quarantine_dir
        self._build = build
        self._warm: dict[tuple[str, ...], Deidentifier] = {}

    def get(self, options: list[DeidOption] | None = None) -> Deidentifier:
        """The de-identifier for ``options`` (``[deid] options`` when None);
        DeidentificationError when the settings cannot make one."""
        deid = self.settings
        if options is not None:
            deid = deid.model_copy(update={"options": options})
        key = tuple(sorted(o.value for o in deid.options))
        if key not in self._warm:
            self._warm[key] = self._build(deid)
        return self._warm[key]

    def make(
        self,
        sources: list[Path],
        work: Path,
        *,
        options: list[DeidOption] | None,
        job_id: str,
        read: Callable[[Path], Dataset],
        own: Callable[[Dataset, Made], bool],
        check_space: Callable[[], None],
    ) -> Made:
        """De-identify each source into ``work``: an instance de-identification refuses is
        quarantined (counted, with a note), the node's own outputs are skipped (``own`` notes
        them), and each mapping is recorded in the honest-broker file. ``check_space`` runs
        before each output; DeidentificationError when de-identification cannot run at all."""
        deid = self.get(options)
        made = Made()
        mappings: list[Mapping] = []
        for path in sources:
            check_space()
            source = read(path)
            original = Identity.of(source)  # before de-identification changes it in place
            sop = original.sop_instance_uid
            if own(source, made):
                continue
            try:
                output, target = deidentify_to_file(deid, source, self.settings.output, work)
            except Quarantined as exc:
                made.quarantined += 1
                made.notes.append(f"{sop}: {exc}")
                log.warning("job %s: instance %s quarantined: %s", job_id, sop, exc)
                if self.quarantine_dir is not None:
                    keep_source(path, self.quarantine_dir, job_id, str(exc), original)
                metrics.quarantined("deid")
                continue
            made.add(target, output, sop, original.series_instance_uid)
            mappings.append(Mapping(original, Identity.of(output)))
        broker = self.settings.honest_broker_file
        if broker is not None and mappings:
            record_mappings(broker, mappings)
        return made


def keep_source(path: Path, quarantine_dir: Path, job_id: str, reason: str,
                identity: Identity) -> Path:
    """Keep a copy of a source de-identification quarantined, until a person decides
    (``synthnode quarantine`` or the console): ``<quarantine_dir>/<job_id>/<sop>.dcm`` beside
    ``<sop>.reason.json`` (UIDs and the reason: no patient data). The file is the
    identifiable original: only admins see it."""
    folder = quarantine_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    sop = identity.sop_instance_uid
    # the file's name from its UID only when it is one (a fetched source's header was never
    # checked): else a name no header can steer out of the folder
    name = sop if is_valid_uid(sop) else "sha256-" + hashlib.sha256(sop.encode()).hexdigest()
    target = folder / f"{name}.dcm"
    atomic_write(target, path.read_bytes(), durable=True, mode=0o600)
    atomic_write(folder / f"{name}.reason.json", json.dumps({
        "job": job_id, "file": target.name, "kind": "deid", "reason": reason,
        "sop": sop, "study": identity.study_instance_uid,
        "series": identity.series_instance_uid, "at": time.time()}, indent=2), durable=True)
    return target
