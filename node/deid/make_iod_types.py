"""Build ``iod_types.json`` from the ``dicom-standard`` package's JSON (PS3.3 parsed by
Innolitics; its 0.1.0 wheel carries the 2020 standard), for the attributes of Table E.1-1
whose action removes or may remove them (X and the compound actions):

- ``types``: their Type at the top level of each storage IOD, by SOP Class UID;
- ``nested``: their Type inside a given sequence ("PARENT/TAG"), strictest over all modules.

Run once when either table changes::

    pip download --no-deps dicom-standard==0.1.0 -d /tmp/w && cd /tmp/w && unzip -q *.whl
    python -m node.deid.make_iod_types /tmp/w/dicom_standard-0.1.0.data/data/standard
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pydicom.uid import UID_dictionary

from node.deid.profile import table

_ORDER = ("1", "1C", "2", "2C", "3")  # strictest first
_RANK = {t: i for i, t in enumerate(_ORDER)}


def build(standard: Path) -> dict[str, object]:
    _, rows = table()
    compound = {r.tag for r in rows if "X" in r.basic or "/" in r.basic}
    ciods = {c["name"]: c["id"] for c in json.loads((standard / "ciods.json").read_text())}
    modules: dict[str, set[str]] = {}
    for link in json.loads((standard / "ciod_to_modules.json").read_text()):
        modules.setdefault(link["ciodId"], set()).add(link["moduleId"])
    types: dict[str, dict[str, int]] = {}  # module -> tag -> strictest type
    nested: dict[str, int] = {}  # "PARENT/TAG" -> strictest type
    for attr in json.loads((standard / "module_to_attributes.json").read_text()):
        parts = attr["path"].split(":")
        tag = parts[-1].upper()
        rank = _RANK.get(str(attr["type"]).upper())
        if tag not in compound or rank is None:
            continue
        if len(parts) == 2:
            current = types.setdefault(attr["moduleId"], {}).get(tag, 9)
            types[attr["moduleId"]][tag] = min(current, rank)
        else:
            key = f"{parts[-2].upper()}/{tag}"
            nested[key] = min(nested.get(key, 9), rank)
    out: dict[str, dict[str, str]] = {}
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind != "SOP Class" or "Storage" not in name:
            continue
        ciod = ciods.get(re.sub(r" Storage.*$", "", name))
        if ciod is None:
            continue
        per_tag: dict[str, int] = {}
        for module in modules.get(ciod, ()):
            for tag, rank in types.get(module, {}).items():
                per_tag[tag] = min(per_tag.get(tag, 9), rank)
        if per_tag:
            out[uid] = {tag: _ORDER[rank] for tag, rank in sorted(per_tag.items())}
    return {"source": "dicom-standard 0.1.0 (PS3.3, 2020): Types of the Table E.1-1 attributes "
                      "with X or compound actions, strictest over an IOD's modules (types) and "
                      "over every sequence that holds them (nested)",
            "types": out,
            "nested": {key: _ORDER[rank] for key, rank in sorted(nested.items())}}


if __name__ == "__main__":
    target = Path(__file__).with_name("iod_types.json")
    target.write_text(json.dumps(build(Path(sys.argv[1])), indent=0, sort_keys=True) + "\n")
    print(f"wrote {target}")
