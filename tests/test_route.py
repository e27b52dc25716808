"""Routing rules: each criterion both ways, per-series matching, mode first vs all, the default
rules, explanations without patient data, and ``synthnode rules test`` end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage

from node.cli import main
from node.config import (
    ConfigError,
    RouteMode,
    Rule,
    RuleMatch,
    RuleTask,
    Settings,
    TaskKind,
    load_settings,
)
from node.route import Evaluation, SeriesFacts, evaluate, series_facts
from tests.nodeproc import make_study

PLANTED_NAME = "Plantedname^Jane"
PLANTED_ID = "PID-PLANTED-77"


def edit(path: Path, **attributes: Any) -> None:
    """Set (or, with None, delete) attributes of a DICOM file in place."""
    ds = dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def study(folder: Path, *modalities: str, per_series: int = 1, **attributes: Any) -> list[Path]:
    """One study of CT_small copies, a series per modality, the attributes set on every file."""
    paths = make_study(folder, series=len(modalities), per_series=per_series,
                       patient_name=PLANTED_NAME, patient_id=PLANTED_ID)
    for path in paths:
        edit(path, Modality=modalities[int(path.name[1:3])], **attributes)
    return paths


def facts(paths: list[Path], **aets: str) -> list[SeriesFacts]:
    scan = series_facts(paths, **aets)
    assert not scan.unreadable
    return scan.series


def rule(name: str, *tasks: TaskKind, **match: Any) -> Rule:
    return Rule(name=name, match=RuleMatch(**match),
                tasks=[RuleTask(task=t) for t in tasks or (TaskKind.DEIDENTIFY,)])


def only(evaluations: list[Evaluation]) -> Evaluation:
    assert len(evaluations) == 1
    return evaluations[0]


def applied(evaluation: Evaluation) -> dict[str, tuple[str, ...]]:
    return {r.name: uids for r, uids in evaluation.applied()}


def test_series_facts_groups_files_by_series(tmp_path: Path) -> None:
    a = make_study(tmp_path / "in" / "a", series=2, per_series=3)
    b = make_study(tmp_path / "in" / "nested" / "b")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    no_series = make_study(tmp_path / "other")[0]
    edit(no_series, SeriesInstanceUID=None)
    first = dcmread(a[0])
    scan = series_facts([tmp_path / "in", no_series],
                        aets={str(first.SOPInstanceUID): ("CT1", "SYNTHNODE")})
    assert [(s.study_uid, s.series_uid) for s in scan.series] == sorted(
        {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in map(dcmread, a + b)})
    by_series = {s.series_uid: s for s in scan.series}
    one = by_series[str(first.SeriesInstanceUID)]
    assert one.files == tuple(a[:3])
    assert (one.calling_aet, one.called_aet) == ("CT1", "SYNTHNODE")
    assert one.header.SOPInstanceUID == first.SOPInstanceUID
    assert "PixelData" not in one.header
    other = by_series[str(dcmread(b[0]).SeriesInstanceUID)]
    assert (other.calling_aet, other.called_aet) == ("", "")
    assert sorted((u.path.name, u.reason) for u in scan.unreadable) == [
        ("notes.txt", "not a DICOM file"), (no_series.name, "no Study or Series Instance UID")]


@pytest.fixture
def chest(tmp_path: Path) -> SeriesFacts:
    """A CR series of a chest, sent by CT1 to SYNTHNODE."""
    paths = study(tmp_path, "CR", BodyPartExamined="CHEST", StudyDescription="Chest PA",
                  SeriesDescription="lateral view", Manufacturer="ACME",
                  ImageType=["ORIGINAL", "PRIMARY"])
    (series,) = facts(paths, calling_aet="CT1", called_aet="SYNTHNODE")
    return series


@pytest.mark.parametrize(("match", "ok", "detail"), [
    ({"modality": ["cr"]}, True, 'Modality "CR" is one of cr'),
    ({"modality": ["MR", "CT"]}, False, 'Modality "CR" is not one of MR, CT'),
    ({"body_part": [" chest "]}, True, 'BodyPartExamined "CHEST" is one of  chest '),
    ({"body_part": ["HEAD"]}, False, 'BodyPartExamined "CHEST" is not one of HEAD'),
    ({"sop_class": [CTImageStorage]}, True, f'SOPClassUID "{CTImageStorage}" is one of'),
    ({"sop_class": [MRImageStorage]}, False, f'SOPClassUID "{CTImageStorage}" is not one of'),
    ({"study_description": "^chest"}, True, "StudyDescription matches /^chest/"),
    ({"study_description": "abdomen"}, False, "StudyDescription does not match /abdomen/"),
    ({"series_description": "LAT"}, True, "SeriesDescription matches /LAT/"),
    ({"series_description": "^view"}, False, "SeriesDescription does not match /^view/"),
    ({"calling_aet": ["ct1"]}, True, 'calling AE title "CT1" is one of ct1'),
    ({"calling_aet": ["MR1"]}, False, 'calling AE title "CT1" is not one of MR1'),
    ({"called_aet": ["SYNTHNODE"]}, True, 'called AE title "SYNTHNODE" is one of SYNTHNODE'),
    ({"called_aet": ["OTHER"]}, False, 'called AE title "SYNTHNODE" is not one of OTHER'),
    ({"tags": {"Manufacturer": "acme"}}, True, "Manufacturer matches /acme/"),
    ({"tags": {"Manufacturer": "^GE"}}, False, "Manufacturer does not match /^GE/"),
    ({"tags": {"ImageType": r"^original\\primary$"}}, True, "ImageType matches"),
    ({"tags": {"ImageType": "^primary"}}, False, "ImageType does not match"),
    ({"tags": {"TransferSyntaxUID": r"^1\.2\.840\.10008\.1\.2\.1$"}}, True,
     "TransferSyntaxUID matches"),  # File Meta Information
    ({"tags": {"ProtocolName": "x"}}, False, "ProtocolName is absent (wanted /x/)"),
    ({"tags": {"OtherPatientIDsSequence": "."}}, False,
     "OtherPatientIDsSequence is a sequence: a sequence cannot be matched"),
])
def test_each_criterion(chest: SeriesFacts, match: dict[str, Any], ok: bool,
                        detail: str) -> None:
    evaluation = only(evaluate([rule("r", **match)], RouteMode.ALL, [chest]))
    (verdict,) = evaluation.verdicts
    (criterion,) = verdict.criteria
    key = next(iter(match))
    assert criterion.name == (f"tags.{next(iter(match['tags']))}" if key == "tags" else key)
    assert (criterion.ok, verdict.matched, verdict.applied) == (ok, ok, ok)
    assert criterion.detail.startswith(detail), criterion.detail
    assert bool(evaluation.applied()) is ok


def test_missing_attributes_and_unknown_aets_fail_as_absent(tmp_path: Path) -> None:
    (series,) = facts(study(tmp_path, "CT", BodyPartExamined=None))  # CT_small has none
    match = RuleMatch(body_part=["CHEST"], study_description=".", calling_aet=["CT1"])
    details = [c.detail for c in evaluate([Rule(name="r", match=match, tasks=[
        RuleTask(task=TaskKind.FORWARD)])], RouteMode.ALL, [series])[0].verdicts[0].criteria]
    assert details == ["BodyPartExamined is absent (wanted one of CHEST)",
                       "StudyDescription matches /./",  # CT_small's own "e+1"
                       "calling AE title is absent (wanted one of CT1)"]
    assert evaluate([rule("any")], RouteMode.ALL, [series])[0].verdicts[0].criteria == ()


def test_rules_apply_per_series_of_a_mixed_study(tmp_path: Path) -> None:
    series = facts(study(tmp_path, "CR", "MR", "CR"))
    cr = tuple(s.series_uid for s in series if s.header.Modality == "CR")
    mr = tuple(s.series_uid for s in series if s.header.Modality == "MR")
    rules = [rule("radiographs", TaskKind.IMG2IMG, modality=["CR"]),
             rule("mr", TaskKind.FORWARD, modality=["MR"]), rule("ct", modality=["CT"])]
    evaluation = only(evaluate(rules, RouteMode.ALL, series))
    assert applied(evaluation) == {"radiographs": cr, "mr": mr}
    assert [r.name for r, _ in evaluation.applied()] == ["radiographs", "mr"]


def test_mode_first_shadows_later_rules_mode_all_applies_every_match(tmp_path: Path) -> None:
    series = facts(study(tmp_path, "CR", "MR"))
    cr, mr = (next(s.series_uid for s in series if s.header.Modality == m) for m in ("CR", "MR"))
    rules = [rule("radiographs", TaskKind.IMG2IMG, modality=["CR"]), rule("everything"),
             rule("also-everything", TaskKind.FORWARD)]
    every = only(evaluate(rules, RouteMode.ALL, series))
    assert applied(every) == {"radiographs": (cr,), "everything": tuple(
        s.series_uid for s in series), "also-everything": tuple(s.series_uid for s in series)}
    assert all(v.shadowed_by is None for v in every.verdicts)

    first = only(evaluate(rules, RouteMode.FIRST, series))
    assert applied(first) == {"radiographs": (cr,), "everything": (mr,)}
    shadowed = {(v.rule, v.series_uid): v.shadowed_by for v in first.verdicts if v.shadowed_by}
    assert shadowed == {("everything", cr): "radiographs", ("also-everything", cr): "radiographs",
                        ("also-everything", mr): "everything"}
    assert all(v.matched for v in first.verdicts if v.shadowed_by)
    text = "\n".join(first.explain())
    assert 'rule "also-everything" applies to no series' in text
    assert 'matches, but rule "radiographs" took it first (mode first)' in text


def test_default_rules_deidentify_all_and_make_synthetic_radiographs(tmp_path: Path) -> None:
    series = facts(study(tmp_path, "CR", "MR"))
    cr, mr = (next(s.series_uid for s in series if s.header.Modality == m) for m in ("CR", "MR"))
    evaluation = only(evaluate(Settings().rules, Settings().route.mode, series))
    assert applied(evaluation) == {"deidentify-all": tuple(s.series_uid for s in series),
                                "synthetic-radiographs": (cr,)}
    lines = evaluation.explain()
    assert '  rule "synthetic-radiographs" applies to 1 of 2 series: img2img -> orthanc' in lines
    assert f'    series {mr} (MR, 1 file): no: Modality "MR" is not one of CR, DX' in lines


def test_explanations_name_failing_criteria_and_never_patient_data(tmp_path: Path) -> None:
    paths = study(tmp_path / "a", "MR", StudyDescription=f"MR head of {PLANTED_NAME} {PLANTED_ID}",
                  SeriesDescription=f"for {PLANTED_ID}", BodyPartExamined="HEAD")
    paths += study(tmp_path / "b", "CT")
    rules = [rule("knees", study_description="knee", series_description="^t1",
                  tags={"PatientName": "^Doe", "PatientID": "^X"}),
             rule("heads", modality=["CT"], tags={"PatientName": "jane", "PatientID": "77$"})]
    evaluations = evaluate(rules, RouteMode.FIRST, facts(paths))
    assert len(evaluations) == 2
    for evaluation in evaluations:
        text = "\n".join(evaluation.explain())
        for planted in (PLANTED_NAME, "Plantedname", PLANTED_ID, "PLANTED", "MR head"):
            assert planted.casefold() not in text.casefold()
    (mr,) = [r for r in evaluations if r.series[0].header.Modality == "MR"]
    (ct,) = [r for r in evaluations if r is not mr]
    assert [r.name for r, _ in ct.applied()] == ["heads"]
    assert ct.explain()[-1].endswith(': Modality "CT" is one of CT; PatientName matches /jane/; '
                                     "PatientID matches /77$/")
    assert not mr.applied()
    assert mr.explain()[-1] == "  no rule matches this study: nothing will be made of it"
    assert f"    series {mr.series[0].series_uid} (MR, 1 file): no: " \
           "StudyDescription does not match /knee/; SeriesDescription does not match /^t1/; " \
           "PatientName does not match /^Doe/; PatientID does not match /^X/" in mr.explain()
    heads = next(v for v in mr.verdicts if v.rule == "heads")
    assert [(c.name, c.ok) for c in heads.criteria] == [
        ("modality", False), ("tags.PatientName", True), ("tags.PatientID", True)]
    assert mr.explain()[-2].endswith(': no: Modality "MR" is not one of CT')
    assert ct.explain()[2].endswith(": no: StudyDescription does not match /knee/; "
                                    "SeriesDescription is absent (wanted /^t1/); "
                                    "PatientName does not match /^Doe/; "
                                    "PatientID does not match /^X/")


RULES_TOML = """
[route]
mode = "first"

[[rules]]
name = "radiographs"
destinations = ["orthanc", "pacs"]
match = {modality = ["CR", "DX"], calling_aet = ["XR1"]}
tasks = [{task = "deidentify"}, {task = "img2img", destinations = ["pacs"]}]

[[rules]]
name = "mr-heads"
match = {modality = ["MR"], body_part = ["HEAD"]}
tasks = [{task = "forward"}]

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
"""


def test_cli_rules_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(RULES_TOML)
    cr = study(tmp_path / "cr", "CR", per_series=2)
    mr = study(tmp_path / "mr", "MR", BodyPartExamined="KNEE")
    (tmp_path / "cr" / "junk.bin").write_bytes(b"\0" * 300)
    cr_uid, mr_uid = (str(dcmread(p[0]).StudyInstanceUID) for p in (cr, mr))

    assert main(["--config", str(cfg), "rules", "test", str(tmp_path / "cr"),
                 "--calling-aet", "XR1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 configured rules, mode first\n")
    assert f"study {cr_uid} (1 series)" in out
    assert ('rule "radiographs" applies to 1 of 1 series: deidentify -> orthanc, pacs; '
            "img2img -> pacs") in out
    assert "(CR, 2 files): Modality \"CR\" is one of CR, DX; calling AE title \"XR1\"" in out
    assert 'no: Modality "CR" is not one of MR' in out
    assert f"unreadable: {tmp_path / 'cr' / 'junk.bin'}: not a DICOM file" in out
    assert out.endswith("1 study, 0 matched by no rule, 1 unreadable files\n")

    assert main(["--config", str(cfg), "rules", "test", str(tmp_path / "cr"),
                 str(tmp_path / "mr")]) == 1
    out = capsys.readouterr().out
    assert "calling AE title is absent (wanted one of XR1)" in out
    assert f"study {mr_uid} (1 series)" in out
    assert 'BodyPartExamined "KNEE" is not one of HEAD' in out
    assert out.count("no rule matches this study: nothing will be made of it") == 2
    assert PLANTED_NAME not in out and PLANTED_ID not in out

    assert main(["rules", "test", str(tmp_path / "mr"), "--called-aet", "SYNTHNODE"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 default rules, mode all\n")
    assert 'rule "deidentify-all" applies to 1 of 1 series: deidentify -> orthanc' in out

    assert main(["rules", "test", str(tmp_path / "cr" / "junk.bin"),
                 str(tmp_path / "missing.dcm")]) == 2
    captured = capsys.readouterr()
    assert "no DICOM file found" in captured.err
    assert f"unreadable: {tmp_path / 'missing.dcm'}: cannot be read" in captured.out
    with pytest.raises(SystemExit) as exit_info:
        main(["rules", "test"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("match", "message"), [
    ('study_description = "chest("', '[[rules]] "r" (1st) match.study_description = '
                                     '\'chest(\': "chest(" is not a regular expression'),
    ('tags = {NotAKeyword = "x"}', '[[rules]] "r" (1st) match.tags = {\'NotAKeyword\': \'x\'}: '
                                   '"NotAKeyword" is not a DICOM keyword'),
    ('tags = {Manufacturer = "[acme"}', ': Manufacturer: "[acme" is not a regular expression'),
])
def test_bad_match_criteria_are_config_errors(tmp_path: Path, match: str, message: str) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[[rules]]\nname = "r"\ntasks = [{{task = "forward"}}]\n[rules.match]\n'
                   f"{match}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert f"{cfg}: " in str(info.value)
    assert message in str(info.value)
