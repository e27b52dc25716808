"""Exceptions described without patient data (node.errors): what pydicom quotes never reaches a
description; the node's own messages and the operating system's reasons do."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.valuerep import DA

from node.deid.engine import Quarantined
from node.errors import describe, describe_unreadable


def test_a_library_message_quoting_a_value_is_reduced_to_its_kind() -> None:
    with pytest.raises(ValueError, match="Doe") as caught:
        DA("Doe^Jane")  # pydicom quotes the value it could not parse
    assert describe(caught.value) == "ValueError"
    assert describe_unreadable(caught.value) == "DICOM header cannot be parsed (ValueError)"


def test_the_nodes_own_messages_and_os_reasons_are_kept(tmp_path: Path) -> None:
    assert describe(Quarantined("burned-in text without a rule")) == (
        "burned-in text without a rule")
    with pytest.raises(OSError) as caught:
        dcmread(tmp_path / "missing.dcm")
    assert describe(caught.value) == "No such file or directory"
    assert describe_unreadable(caught.value) == "cannot be read (No such file or directory)"
    junk = tmp_path / "notes.txt"
    junk.write_text("Doe^Jane, born 19700101")
    with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever pydicom raises
        dcmread(junk)
    assert describe_unreadable(caught.value) == "not a DICOM file"
