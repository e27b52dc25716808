"""The output manifest: a job's outputs, recorded in its work folder once they are all made.

A retry after a delivery failure finds them there and delivers them again without making them
again (the model does not run twice); outputs without a manifest are half made and are not used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from node.archives.outgoing import Made, Outgoing

MANIFEST = "manifest.json"


class Manifest:
    """``manifest.json`` in a job's work folder: its outputs (file name and the identifiers
    dispatch negotiates on), what was quarantined and the notes, for one study generation."""

    @staticmethod
    def exists(work: Path) -> bool:
        """Whether the outputs in ``work`` are complete (of some generation)."""
        return (work / MANIFEST).exists()

    @staticmethod
    def load(work: Path, generation: int) -> Made | None:
        """The outputs recorded in ``work`` for ``generation``; None when there is no manifest,
        it is unreadable, of another generation, or one of its files is gone."""
        try:
            manifest = json.loads((work / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("generation") != generation:
            return None
        files = [Outgoing(work / name, sop_class, sop_instance, ts)
                 for name, sop_class, sop_instance, ts in manifest["files"]]
        if not all(isinstance(f.source, Path) and f.source.exists() for f in files):
            return None
        return Made(files, int(manifest["quarantined"]), list(manifest["notes"]))

    @staticmethod
    def write(work: Path, made: Made, generation: int) -> None:
        """Record ``made`` (its files all in ``work``) for ``generation``, atomically."""
        manifest = {"generation": generation,
                    "files": [[Path(str(f.source)).name, f.sop_class_uid, f.sop_instance_uid,
                               f.transfer_syntax_uid] for f in made.files],
                    "quarantined": made.quarantined, "notes": made.notes}
        tmp = work / f"{MANIFEST}.part"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, work / MANIFEST)
