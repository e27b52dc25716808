"""The archive kinds behind one interface: a job's source survives its record, a destination's
kind picks its module, and a peer that never answers is named in the error."""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from node.archives import ArchiveError, Source, SourceKind, open_archive, read_source
from node.archives.dimse import DicomArchive
from node.archives.orthanc import OrthancArchive
from node.config import Queue, RuleTask, Settings
from node.jobs import Job
from node.localorthanc import free_port


@contextlib.contextmanager
def find_scp(ae_title: str, on_find: Callable[[evt.Event], Any]) -> Iterator[int]:
    """A DICOM peer answering Study Root C-FIND with ``on_find``, on a free port (yielded)."""
    scp = AE(ae_title=ae_title)
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port
    finally:
        server.shutdown()


def settings_with(**destination: object) -> Settings:
    return Settings.model_validate({
        "node": {"dimse_timeout_s": 1.0, "acse_timeout_s": 2.0, "network_timeout_s": 2.0},
        "destinations": [{"name": "pacs", **destination}],
    })


def test_each_kind_opens_its_own_archive() -> None:
    settings = settings_with(ae_title="PACS", host="127.0.0.1", port=104)
    with open_archive("pacs", settings) as pacs, open_archive("orthanc", settings) as orthanc:
        assert isinstance(pacs, DicomArchive) and pacs.label == "PACS@127.0.0.1:104"
        assert isinstance(orthanc, OrthancArchive)
        assert orthanc.label == f"Orthanc at {settings.orthanc.url}"
    with pytest.raises(KeyError, match='no destination "other"'):
        open_archive("other", settings)


def test_a_job_record_keeps_its_typed_source_and_task() -> None:
    task = RuleTask.model_validate({"task": "img2img", "strength": 0.3})
    job = Job(id="j", study_uid="1.2.3", revision=1, rule="r", task_index=0, task=task,
              queue=Queue.CPU, series_uids=("1.2.3.4",), destinations=("orthanc",),
              source=Source(SourceKind.DICOM, "pacs", "1.2.3"))
    back = Job.from_json(job.to_json())
    assert back == job
    assert back.source.kind is SourceKind.DICOM and back.task.strength == 0.3


def test_records_written_before_sources_were_typed_still_read() -> None:
    """A node upgraded with jobs in its queue keeps reading them from where they came."""
    base = {"id": "j", "study_uid": "1.2.3", "generation": 2, "rule": "r", "task_index": 0,
            "task": {"task": "deidentify"}, "queue": "cpu", "series_uids": ["4"],
            "destinations": ["orthanc"], "state": "pending"}
    orthanc = Job.from_json(json.dumps({**base, "orthanc_study": "abc", "orthanc_source": ""}))
    assert orthanc.source == Source(SourceKind.ORTHANC, "orthanc", "abc")
    assert orthanc.revision == 2
    pacs = Job.from_json(json.dumps({**base, "orthanc_study": "", "pacs_source": "pacs"}))
    assert pacs.source == Source(SourceKind.DICOM, "pacs", "1.2.3")
    spool = Job.from_json(json.dumps({**base, "orthanc_study": "", "pacs_source": ""}))
    assert not spool.source.fetched


def test_a_source_whose_archive_changed_kind_is_refused(tmp_path: Path) -> None:
    settings = settings_with(url="http://127.0.0.1:1")
    with pytest.raises(ArchiveError, match='"pacs" as a dicom archive, which is now '
                                           "configured as orthanc") as info:
        read_source(Source(SourceKind.DICOM, "pacs", "1.2.3"), "1.2.3", ["4"], settings,
                    tmp_path / "src")
    assert info.value.permanent


def test_a_peer_that_never_answers_c_find_is_named_with_the_level() -> None:
    """The C-FIND error names the peer and the query level also when no status comes back
    (it used to say only "no answer")."""
    release = threading.Event()

    def never(event: evt.Event):  # type: ignore[no-untyped-def]
        release.wait(10)  # longer than the node's DIMSE timeout (1 s)
        yield 0x0000, None

    with find_scp("SILENT", never) as port:
        try:
            settings = settings_with(ae_title="SILENT", host="127.0.0.1", port=port)
            started = time.monotonic()
            with open_archive("pacs", settings) as archive, pytest.raises(ArchiveError) as info:
                archive.find(datetime.date(2020, 1, 1))
            assert time.monotonic() - started < 8
            assert str(info.value) == (f"C-FIND at SILENT@127.0.0.1:{port} (STUDY) failed: "
                                       "no answer")
        finally:
            release.set()  # (before the server shuts down: its handler waits on it)


def test_a_peer_answers_series_as_stand_in_headers() -> None:
    """Backfill's rules see a PACS's series-level C-FIND answers as the series' headers."""
    def answer(event: evt.Event):  # type: ignore[no-untyped-def]
        query = event.identifier
        if query.QueryRetrieveLevel == "SERIES":
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = query.StudyInstanceUID
            ds.SeriesInstanceUID = "1.2.3.4"
            ds.Modality = "CT"
            ds.NumberOfSeriesRelatedInstances = "7"
            yield 0xFF00, ds
        yield 0x0000, None

    with find_scp("PACS", answer) as port:
        settings = settings_with(ae_title="PACS", host="127.0.0.1", port=port)
        with open_archive("pacs", settings) as archive:
            from node.archives import FoundStudy

            (series,) = archive.series(FoundStudy("1.2.3", "1.2.3", "20200101", 0))
        assert series.series_uid == "1.2.3.4" and series.instances == 7
        assert series.header.Modality == "CT" and not series.own
