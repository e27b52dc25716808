"""Fuzz target: the receive path's element walker (node.receive.check).

On any input, ``inspect_dataset`` returns a Header or raises RejectedDataset with a reason;
nothing else escapes, no input makes it hang (every step advances), and the UIDs it returns
are valid and lie inside the data. ``check_against_request`` accepts the header's own UIDs
and refuses others. An input is one byte choosing the transfer syntax, then the data set.

    PYTHONPATH=$PWD .venv/bin/python tests/fuzz/fuzz_walker.py --seeds=/tmp/walker \\
        -max_total_time=600 -timeout=10 -rss_limit_mb=2048
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fuzz.harness import instrument

    instrument("node.receive.check")

from pydicom import uid as tsuid  # noqa: E402

from node.receive.check import (  # noqa: E402
    Header,
    RejectedDataset,
    StoreStatus,
    check_against_request,
    inspect_dataset,
)
from node.uids import is_valid_uid  # noqa: E402
from tests.fuzz.harness import decode_input, run, seed_inputs  # noqa: E402

TARGET = "walker"


def one_input(data: bytes) -> None:
    _, transfer_syntax, dataset = decode_input(data)
    try:
        header = inspect_dataset(dataset, transfer_syntax)
    except RejectedDataset as exc:
        assert exc.reason and isinstance(exc.status, StoreStatus), exc
        return
    assert isinstance(header, Header)
    uids = (header.sop_class_uid, header.sop_instance_uid, header.study_uid, header.series_uid)
    for uid in uids:
        assert is_valid_uid(uid), uid
        if transfer_syntax != tsuid.DeflatedExplicitVRLittleEndian:
            assert uid.encode() in dataset, f"{uid} is not in the data"
    check_against_request(header, header.sop_class_uid, header.sop_instance_uid)
    for request in ((header.sop_class_uid + ".1", header.sop_instance_uid),
                    (header.sop_class_uid, header.sop_instance_uid + ".1")):
        try:
            check_against_request(header, *request)
        except RejectedDataset as exc:
            assert exc.reason
        else:
            raise AssertionError(f"a request for {request} accepted {header}")


def write_seeds(corpus: Path) -> None:
    for name, data in seed_inputs():
        (corpus / name).write_bytes(data)


if __name__ == "__main__":
    run(one_input, write_seeds, sys.argv)
