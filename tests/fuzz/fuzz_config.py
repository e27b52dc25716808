"""Fuzz target: the configuration loader (node.config.load_settings) on mutated TOML text.

An input is a TOML file's text, optionally followed by a NUL byte and environment lines
``SYNTHNODE__SECTION__KEY=value``. Loading returns Settings or raises ConfigError with a
message; nothing else escapes (no pydantic traceback, no UnicodeDecodeError, no
RecursionError).

    PYTHONPATH=$PWD .venv/bin/python tests/fuzz/fuzz_config.py --seeds=/tmp/config \\
        -max_total_time=600 -timeout=10 -rss_limit_mb=2048
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fuzz.harness import instrument

    instrument("node.config")

from node.config import ConfigError, Settings, load_settings  # noqa: E402
from tests.fuzz.harness import run  # noqa: E402

TARGET = "config"
ROOT = Path(__file__).resolve().parents[2]
SEEDS = (ROOT / "config" / "node.example.toml", ROOT / "config" / "orthanc" / "node.toml")
SEED_ENVIRONMENTS = (
    b"",
    b"\0SYNTHNODE__DEID__KEY=fuzz-only-zVHeMArZw-VWGBFzXZdBF6xeSD2y6HdpJ2oQczc_BPw\n"
    b"SYNTHNODE__NODE__PORT=11113\nSYNTHNODE__JOBS__WORKERS=2",
    b'\0SYNTHNODE__RULES=[{name = "r", tasks = [{task = "deidentify"}]}]\n'
    b"SYNTHNODE__ORTHANC__PASSWORD=secret",
)

_files: list[Path] = []


def config_file() -> Path:
    """One scratch file per process, removed when it ends."""
    if not _files:
        folder = Path(tempfile.mkdtemp(prefix="synthnode-fuzz-config-"))
        _files.append(folder / "node.toml")
        atexit.register(shutil.rmtree, folder, True)
    return _files[0]


def one_input(data: bytes) -> None:
    text, _, env = data.partition(b"\0")
    environ = {}
    for line in env.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and name and "\0" not in name + value:
            environ[name] = value
    path = config_file()
    path.write_bytes(text)
    try:
        settings = load_settings(path, environ)
    except ConfigError as exc:
        message = str(exc)
        assert message, "a ConfigError without a message"
        assert "errors.pydantic.dev" not in message and "Traceback" not in message, message
        return
    assert isinstance(settings, Settings)


def write_seeds(corpus: Path) -> None:
    for path in SEEDS:
        for i, env in enumerate(SEED_ENVIRONMENTS):
            (corpus / f"{path.parent.name}-{path.stem}-{i}").write_bytes(path.read_bytes() + env)


if __name__ == "__main__":
    run(one_input, write_seeds, sys.argv)
