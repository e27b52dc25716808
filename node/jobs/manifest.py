"""The output manifest: a job's outputs, recorded in its work folder once they are all made.

A retry after a delivery failure finds them there and delivers them again without making them
again (the model does not run twice); outputs without a manifest are half made and are not used.
"""

from __future__ import annotations

import json
from pathlib import Path

from node.archives.outgoing import Made, Outgoing
from node.files import atomic_write

MANIFEST = "manifest.json"


def rejected_dir(work_dir: Path, job_id: str) -> Path:
    """Where an approved job keeps its outputs of the series a reviewer rejected."""
    return work_dir / f"{job_id}.rejected"


class Manifest:
    """``manifest.json`` in a job's work folder: its outputs (file name and the identifiers
    dispatch negotiates on), what was quarantined and the notes, for one study revision."""

    @staticmethod
    def exists(work: Path) -> bool:
        """Whether the outputs in ``work`` are complete (of some revision)."""
        return (work / MANIFEST).exists()

    @staticmethod
    def load(work: Path, revision: int) -> Made | None:
        """The outputs recorded in ``work`` for ``revision``; None when there is no manifest,
        it is unreadable, of another revision, or one of its files is gone."""
        try:
            manifest = json.loads((work / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("revision", manifest.get("generation")) != revision:  # (0.1: generation)
            return None
        files = [Outgoing(work / name, sop_class, sop_instance, ts)
                 for name, sop_class, sop_instance, ts in manifest["files"]]
        if not all(isinstance(f.source, Path) and f.source.exists() for f in files):
            return None
        return Made(files, int(manifest["quarantined"]), list(manifest["notes"]),
                    dict(manifest.get("sources", {})), dict(manifest.get("series", {})))

    @staticmethod
    def write(work: Path, made: Made, revision: int) -> None:
        """Record ``made`` (its files all in ``work``) for ``revision``, atomically."""
        manifest = {"revision": revision,
                    "files": [[Path(str(f.source)).name, f.sop_class_uid, f.sop_instance_uid,
                               f.transfer_syntax_uid] for f in made.files],
                    "quarantined": made.quarantined, "notes": made.notes,
                    "sources": made.made_from, "series": made.series_of}
        atomic_write(work / MANIFEST, json.dumps(manifest))
