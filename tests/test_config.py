"""Settings: validation messages, the example file, environment overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from node.config import ConfigError, DestinationKind, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "node.example.toml"


def test_example_documents_every_key_with_the_defaults() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    defaults = Settings()
    # Lists of tables ([[destinations]]) and keys without a TOML default (None) are documented
    # commented out.
    assert set(data) | {"destinations"} == set(Settings.model_fields)
    assert "# [[destinations]]" in text
    for section, model in Settings.model_fields.items():
        if section in ("destinations", "rules"):
            continue
        annotation = model.annotation
        assert annotation is not None
        for name, field in annotation.model_fields.items():
            key = field.alias or name
            documented = (key in data[section] or f"# {key} =" in text
                          or f"# [[{section}.{key}]]" in text or f"# [{section}.{key}]" in text)
            assert documented, f"[{section}] {key} is not in the example"
        assert set(data[section]) <= {f.alias or n for n, f in annotation.model_fields.items()}
    loaded = load_settings(EXAMPLE, environ={})
    resolved = {"spool": {"dir"}, "output": {"quarantine_dir"},
                "jobs": {"sqlite_file", "work_dir"}}
    assert loaded.rules == defaults.rules
    for section in ("node", "spool", "orthanc", "output", "dispatch", "deid", "jobs", "route",
                    "log"):
        skip = resolved.get(section, set())
        assert getattr(loaded, section).model_dump(exclude=skip) == getattr(
            defaults, section
        ).model_dump(exclude=skip), section
    assert loaded.spool.dir == EXAMPLE.parent / defaults.spool.dir
    assert loaded.jobs.sqlite_file == EXAMPLE.parent / defaults.jobs.sqlite_file
    assert loaded.output.quarantine_dir == EXAMPLE.parent / defaults.output.quarantine_dir


def test_errors_name_file_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[node]\nport = 70000\nae_title = "A\\\\B"\n[spool]\non_duplicate = "newest"\nsize = 1\n'
        "[nodes]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    lines = str(info.value).splitlines()
    assert f"{cfg}: [node] port = 70000: Input should be less than or equal to 65535" in lines
    assert any(line.startswith(f"{cfg}: [node] ae_title = 'A\\\\B'") for line in lines)
    assert (
        f"{cfg}: [spool] on_duplicate = 'newest': Input should be 'keep_first' or 'replace'"
        in lines
    )
    assert any("[spool] size: unknown key (allowed: dir, stable_after_s" in x for x in lines)
    unknown = f"{cfg}: [nodes]: unknown section (allowed: [node], [spool]"
    assert any(x.startswith(unknown) for x in lines)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid TOML"):
        load_settings(bad, environ={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nport = 104\n[spool]\ndir = "data"\n')
    env = {
        "SYNTHNODE__NODE__PORT": "11113",
        "SYNTHNODE__NODE__ALLOWED_CALLING_AETS": '["CT1", "MR1"]',
        "SYNTHNODE_CONFIG": str(cfg),
    }
    settings = load_settings(environ=env)
    assert settings.node.port == 11113
    assert settings.node.allowed_calling_aets == ["CT1", "MR1"]
    assert settings.spool.dir == tmp_path / "data"  # relative to the file's folder
    with pytest.raises(ConfigError, match=r"environment: \[node\] port = 'x'"):
        load_settings(environ={"SYNTHNODE__NODE__PORT": "x"})


def test_destinations_and_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[[destinations]]\nname = "research"\nae_title = "RESEARCH"\nhost = "127.0.0.1"\n'
        "port = 4242\n"
    )
    settings = load_settings(cfg, environ={"SYNTHNODE__ORTHANC__PASSWORD": "s3cret"})
    assert settings.destination("research").port == 4242
    assert settings.orthanc.password == "s3cret"
    with pytest.raises(KeyError, match='no destination "other" \\(known: orthanc, research\\)'):
        settings.destination("other")
    cfg.write_text(cfg.read_text() * 2)
    with pytest.raises(ConfigError, match="destination names must be unique"):
        load_settings(cfg, environ={})
    with pytest.raises(ConfigError, match=r"\[output\] uid_root = '1\.2\.x'"):
        load_settings(environ={"SYNTHNODE__OUTPUT__UID_ROOT": '"1.2.x"'})


def test_rule_keys_are_documented_and_rule_errors_leak_no_secret(tmp_path: Path) -> None:
    from node.config import RuleMatch, RuleTask

    text = EXAMPLE.read_text()
    for model in (RuleTask, RuleMatch):
        for name in model.model_fields:
            assert name in text, f"rules key {name} is not in the example"
    cfg = tmp_path / "node.toml"
    cfg.write_text('[deid]\nkey = "very-secret-key-value"\n[[rules]]\nname = "r"\n'
                   'destinations = ["nowhere"]\n[[rules.tasks]]\ntask = "deidentify"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert 'rule "r": destination "nowhere" is neither "orthanc" nor a [[destinations]]' in (
        message)
    assert "very-secret-key-value" not in message


def test_the_readme_mirror_config_is_valid(tmp_path: Path) -> None:
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    (mirror,) = [b for b in blocks if 'name = "mirror"' in b]
    cfg = tmp_path / "node.toml"
    cfg.write_text(mirror)
    settings = load_settings(cfg, environ={"RESEARCH_ORTHANC_PASSWORD": "pw"})
    (rule,) = settings.rules
    assert rule.match.source == ["dicom", "orthanc", "backfill"]
    research = settings.destination("research")
    assert research.orthanc_settings(settings.orthanc, {"RESEARCH_ORTHANC_PASSWORD": "pw"}
                                     ).password == "pw"
    assert settings.destination("clinical-pacs").kind is DestinationKind.DICOM


def test_errors_in_arrays_of_tables_name_the_entry_and_its_allowed_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[deid]\nkey = "a-secret-that-must-not-show"\n'
        '[[deid.pixel_rules]]\nname = "us"\nregoins = []\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        "colour = 1\n"
        '[[rules]]\nname = "a"\ntasks = [{task = "deidentify"}]\n'
        '[[rules]]\nname = "ct-deid"\n'
        'match = {modalty = ["CT"], study_description = "("}\n'
        'tasks = [{task = "deidentify", sede = 3}, {task = "img2img", strength = 3}]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    lines = [line.removeprefix(f"{cfg}: ") for line in str(info.value).splitlines()]
    assert ('[[rules]] "ct-deid" (2nd) match.modalty: unknown key (allowed: modality, '
            "body_part, sop_class,") in "\n".join(lines)
    assert ('[[rules]] "ct-deid" (2nd) match.study_description = \'(\': "(" is not a regular '
            "expression") in "\n".join(lines)
    assert any(line.startswith('[[rules]] "ct-deid" (2nd) tasks (1st, deidentify).sede: '
                               "unknown key (allowed: task, destinations, prompt,")
               for line in lines), lines
    assert ('[[rules]] "ct-deid" (2nd) tasks (2nd, img2img).strength = 3: Input should be less '
            "than or equal to 1") in lines
    assert any(line.startswith('[[destinations]] "pacs" (1st) colour: unknown key (allowed: '
                               "name, review, ae_title, host, port,") for line in lines), lines
    assert any(line.startswith('[[deid.pixel_rules]] "us" (1st) regoins: unknown key (allowed: '
                               "name, manufacturer,") for line in lines), lines
    assert '[[deid.pixel_rules]] "us" (1st) regions: required key missing' in lines
    text = "\n".join(lines)
    assert "Value error" not in text and "(allowed: )" not in text
    assert "a-secret-that-must-not-show" not in text
    assert " 0." not in text and " 1." not in text  # no 0-based pydantic indices


def test_secret_values_are_never_echoed_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"SYNTHNODE__ORTHANC__PASSWORD": "[1, 2]"})
    assert "[orthanc] password (a secret, not shown): Input should be a valid string" in str(
        info.value)
    assert "[1, 2]" not in str(info.value)


def test_a_destination_password_never_comes_from_the_file(tmp_path: Path) -> None:
    """Only [orthanc] (by its environment variable) and password_env carry passwords: a
    password in a [[destinations]] entry is refused, and none shows in a repr."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[[destinations]]\nname = "o"\nurl = "http://x"\npassword = "hunter2-x"\n')
    with pytest.raises(ConfigError, match="password: unknown key") as info:
        load_settings(cfg, environ={})
    assert "hunter2-x" not in str(info.value)
    cfg.write_text('[[destinations]]\nname = "o"\nurl = "http://x"\ntls = false\n')
    settings = load_settings(cfg, environ={"SYNTHNODE__ORTHANC__PASSWORD": "hunter2-y"})
    assert settings.orthanc_named("orthanc").password == "hunter2-y"
    assert "hunter2-y" not in repr(settings) + repr(settings.all_destinations)
