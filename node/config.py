"""Settings: one TOML file, validated once at start, then passed down explicitly.

Where settings come from, later sources winning:

1. the defaults below (each documented in ``config/node.example.toml``);
2. the TOML file named by ``--config`` or ``SYNTHNODE_CONFIG``;
3. environment variables ``SYNTHNODE__<SECTION>__<KEY>`` (e.g. ``SYNTHNODE__NODE__PORT=11113``),
   for secrets and for per-host overrides. Values are read as TOML values when they parse as one
   (numbers, booleans, lists), else as strings.

Relative paths in a file are resolved against the file's folder; without a file, against the
current directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from node.uids import MAX_ROOT_LENGTH, is_valid_uid

ENV_CONFIG = "SYNTHNODE_CONFIG"
ORTHANC = "orthanc"
"""The destination name of ``[orthanc]``."""
ENV_PREFIX = "SYNTHNODE__"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "an AE title is 1 to 16 printable ASCII characters, no backslash, not all spaces"
        )
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError:
        pass
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f'"{value}" is not an IP address or network (e.g. "10.0.0.5", '
                         '"10.1.0.0/24", "fd00::/64"); host names are not accepted') from None
    fixed = ipaddress.ip_network(value.strip(), strict=False)
    raise ValueError(f'"{value}" has host bits set: the network is "{fixed}"')


Network = Annotated[str, AfterValidator(_check_network)]
"""An IP address or a network in CIDR notation, kept normalised ("10.0.0.5/32")."""

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$|^$"


class DuplicatePolicy(StrEnum):
    """What to do when an instance arrives whose SOP Instance UID is already spooled with
    different bytes (identical bytes are always acknowledged without a second copy)."""

    KEEP_FIRST = "keep_first"
    """Keep the spooled copy, acknowledge the new one and discard it (logged)."""

    REPLACE = "replace"
    """Replace the spooled copy with the new bytes (logged); the study becomes unstable again."""


class DeidOption(StrEnum):
    """PS3.15 Annex E options (CID 7050), switched on by name in ``[deid] options``."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    """113111: keep private attributes on the ``[deid] safe_private`` allowlist."""

    RETAIN_UIDS = "retain_uids"
    """113110: keep original UIDs (no remapping)."""

    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    """113109: keep device serial numbers, station names and the like."""

    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    """113112: keep institution names, addresses and departments."""

    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    """113108: keep age, sex, size, weight and similar."""

    RETAIN_LONGITUDINAL_FULL_DATES = "retain_longitudinal_full_dates"
    """113106: keep dates and times as they are."""

    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    """113107: shift dates by a per-patient offset (same for all of a patient's studies)."""

    CLEAN_DESCRIPTORS = "clean_descriptors"
    """113105: free-text descriptions replaced by cleaned values, not kept."""

    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    """113104: structured report content cleaned, not removed."""

    CLEAN_GRAPHICS = "clean_graphics"
    """113103: graphics (overlays, curves) cleaned rather than removed."""

    CLEAN_PIXEL_DATA = "clean_pixel_data"
    """113101: burned-in text blanked by the pixel rules (recorded when the pixels are clean)."""

    CLEAN_RECOGNIZABLE_VISUAL_FEATURES = "clean_recognizable_visual_features"
    """113102: images likely to show a face (3D head acquisitions) are quarantined."""


def check_options(value: list[DeidOption]) -> list[DeidOption]:
    """De-identification options that can hold together; ValueError naming the clash."""
    dates = {DeidOption.RETAIN_LONGITUDINAL_FULL_DATES,
             DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES}
    if dates <= set(value):
        raise ValueError("retain_longitudinal_full_dates and "
                         "retain_longitudinal_modified_dates exclude each other")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSVersion(StrEnum):
    """The oldest TLS version a connection may use (BCP 195, which PS3.15 Annex B follows)."""

    V1_2 = "1.2"
    """TLS 1.2 and later."""

    V1_3 = "1.3"
    """TLS 1.3 only."""


class NodeTLS(_Section):
    """``[node.tls]``: DICOM TLS (PS3.15 Annex B secure transport) on its own port; the
    certificate and key are also what the node shows as a TLS client to peers that ask."""

    port: int = Field(ge=1, le=65535, description="TLS listener; 2762 is IANA's dicom-tls")
    plain: bool = Field(
        True, description="also listen without TLS on [node] port; false = TLS only"
    )
    certificate: Path = Field(description="PEM: the node's certificate (and chain)")
    private_key: Path = Field(description="PEM: its private key")
    key_password_env: str = Field(
        "", pattern=_ENV_NAME,
        description="the environment variable holding the key's password (never the file)",
    )
    ca_file: Path | None = Field(
        None, description="PEM: the CA certificates client certificates must chain to"
    )
    verify_client: bool = Field(
        True, description="require a client certificate signed by ca_file (mutual TLS)"
    )
    min_version: TLSVersion = TLSVersion.V1_2

    @model_validator(mode="after")
    def _ca_for_clients(self) -> NodeTLS:
        if self.verify_client and self.ca_file is None:
            raise ValueError("verify_client = true needs ca_file (the CA that signs client "
                             "certificates); or set verify_client = false")
        return self


class NodeSettings(_Section):
    """``[node]``: the DICOM application entity."""

    ae_title: AETitle = "SYNTHNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    peers: dict[AETitle, list[Network]] = Field(
        default_factory=dict,
        description="calling AE title -> the addresses and networks it may call from; "
                    "titles not listed may call from anywhere",
    )
    tls: NodeTLS | None = None
    max_associations: int = Field(16, ge=1, le=1024)
    max_pdu_bytes: int = Field(
        0, ge=0, description="largest PDU we accept; 0 = no limit (peers send big PDUs, faster)"
    )
    poll_interval_s: float = Field(
        0.0002, gt=0, le=0.01,
        description="pynetdicom's polling interval while an association is busy",
    )
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="how long SIGTERM waits for in-flight associations"
    )

    @field_validator("peers")
    @classmethod
    def _peers_allowed(cls, value: dict[str, list[str]], info: ValidationInfo
                       ) -> dict[str, list[str]]:
        allowed = info.data.get("allowed_calling_aets") or []
        for title, networks in value.items():
            if not networks:
                raise ValueError(f"{title}: give at least one address or network")
            if allowed and title not in allowed:
                raise ValueError(f"{title} is bound to addresses but not in "
                                 "allowed_calling_aets, so it could never call: add it there")
        return value

    @field_validator("tls")
    @classmethod
    def _own_port(cls, value: NodeTLS | None, info: ValidationInfo) -> NodeTLS | None:
        port = info.data.get("port")
        if value is not None and value.plain and value.port == port:
            raise ValueError(f"[node.tls] port {port} is also [node] port: give TLS its own "
                             "port (2762 is usual), or set [node.tls] plain = false")
        return value

    @property
    def listens_plain(self) -> bool:
        """Whether the node listens without TLS on ``port``."""
        return self.tls is None or self.tls.plain


class SpoolSettings(_Section):
    """``[spool]``: where received instances are kept until later stages are done with them."""

    dir: Path = Path("var/spool")
    stable_after_s: float = Field(10.0, gt=0)
    check_interval_s: float = Field(1.0, gt=0, le=60)
    on_duplicate: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    fsync: bool = Field(True, description="fsync each instance before acknowledging it")
    retention_s: float = Field(
        3600.0, ge=0, description="a study's files stay this long after all its jobs are done "
                                  "(or no rule matched it), then are removed"
    )
    reserve_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="free space kept on the spool's, work folder's and quarantine's file "
                    "systems: below it new instances are refused (0xA700) and jobs wait",
    )
    reserve_percent: float = Field(
        1.0, ge=0, le=50, description="the same reserve as a share of the file system's size; "
                                      "the larger of the two applies",
    )


class OrthancSettings(_Section):
    """``[orthanc]``: the Orthanc that receives outputs over REST."""

    url: str = Field("http://127.0.0.1:8042", pattern=r"^https?://")
    username: str = ""
    password: str = Field("", repr=False,
                          description="secret: set SYNTHNODE__ORTHANC__PASSWORD, not the file")
    timeout_s: float = Field(30.0, gt=0)
    job_metadata: str = Field("SynthnodeJob", description="user metadata name, index >= 1024")
    task_metadata: str = Field("SynthnodeTask", description="user metadata name, index >= 1024")
    upload_batch: int = Field(
        32, ge=1, le=1000,
        description="instances of one job uploaded in one POST /instances, as a ZIP archive "
                    "(Orthanc >= 1.8.2); 1 = one request per instance")
    upload_batch_bytes: int = Field(64 * 1024**2, ge=1,
                                    description="the most bytes of DICOM files in one ZIP")


class OutputSettings(_Section):
    """``[output]``: how produced objects are identified, checked and set aside."""

    uid_root: str = Field(
        "", description='UID root for outputs; "" = 2.25 (UUID-derived, no registration)'
    )
    validate_objects: bool = Field(
        True, alias="validate", description="run dciodvfy; objects with errors are quarantined"
    )
    quarantine_dir: Path = Path("var/quarantine")
    manufacturer: str = Field("synthnode", min_length=1, max_length=64)

    @field_validator("uid_root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        if value and (not is_valid_uid(value) or len(value) > MAX_ROOT_LENGTH):
            raise ValueError(f"a UID root is a valid UID of at most {MAX_ROOT_LENGTH} "
                             "characters, or empty")
        return value


class DispatchSettings(_Section):
    """``[dispatch]``: retries of transient failures (connection errors, HTTP 5xx, timeouts)."""

    max_attempts: int = Field(6, ge=1, le=100)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)


class DestinationKind(StrEnum):
    """The kinds of archive a ``[[destinations]]`` entry can be (its ``kind``)."""

    ORTHANC = "orthanc"
    """An Orthanc over its REST API (``url``): store; find and fetch for backfill."""

    DICOM = "dicom"
    """A DICOM peer (``ae_title``, ``host``, ``port``): C-STORE; C-FIND and C-GET for
    backfill."""

    DICOMWEB = "dicomweb"
    """A DICOMweb server (``url``, the service root): STOW-RS; QIDO-RS and WADO-RS for
    backfill."""


class _Destination(_Section):
    """What every ``[[destinations]]`` entry has."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    review: bool = Field(False, description="outputs for this destination wait for a "
                                            "reviewer's approval (synthnode review)")
    module: ClassVar[str]
    """The module of ``node.archives`` that speaks to this kind (its ``ARCHIVE`` class)."""


class OrthancDestination(_Destination):
    """``[[destinations]]`` with ``url`` (``kind = "orthanc"``, the default for a url): another
    Orthanc, over REST. ``[orthanc]`` is the one named "orthanc"."""

    url: str = Field(pattern=r"^https?://.+$", description="an Orthanc's REST API")
    username: str = ""
    password_env: str = Field(
        "", pattern=_ENV_NAME,
        description="the environment variable that holds the REST password (never the file)",
    )
    kind: Literal[DestinationKind.ORTHANC] = DestinationKind.ORTHANC
    module: ClassVar[str] = "node.archives.orthanc"

    @model_validator(mode="before")
    @classmethod
    def _no_dicom_tls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if any(str(k).startswith("tls") and v for k, v in data.items()):
            raise ValueError(f'destination "{data.get("name", "")}": tls settings are for '
                             "DICOM peers; an Orthanc is reached over TLS by an https:// url")
        # (tls = false, once a key of every destination, still loads)
        return {k: v for k, v in data.items() if not str(k).startswith("tls")}

    def orthanc_settings(self, base: OrthancSettings, environ: dict[str, str] | None = None
                         ) -> OrthancSettings:
        """``[orthanc]`` for this Orthanc: its url and user, the password from
        ``password_env``, timeouts and metadata names from ``base``."""
        env = os.environ if environ is None else environ
        password = env.get(self.password_env, "") if self.password_env else ""
        return base.model_copy(update={"url": self.url, "username": self.username,
                                       "password": password})


class DicomDestination(_Destination):
    """``[[destinations]]`` with ``ae_title``, ``host`` and ``port`` (``kind = "dicom"``, the
    default for those): a DICOM peer, a PACS."""

    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(False, description="associate over TLS (PS3.15 Annex B)")
    tls_ca: Path | None = Field(
        None, description="PEM: CA certificates to trust for the peer's certificate; "
                          "None = [node.tls] ca_file, else the system's trust store"
    )
    tls_certificate: Path | None = Field(
        None, description="PEM: our client certificate; None = [node.tls] certificate"
    )
    tls_key: Path | None = Field(None, description="PEM: its key; None = [node.tls] private_key")
    tls_key_password_env: str = Field(
        "", pattern=_ENV_NAME, description="the environment variable holding tls_key's password"
    )
    tls_server_name: str = Field(
        "", description='the name the peer\'s certificate must carry; "" = host'
    )
    tls_verify_hostname: bool = Field(
        True, description="false: trust any name in a certificate signed by tls_ca (for peers "
                          "reached by an address their certificate does not name)",
    )
    kind: Literal[DestinationKind.DICOM] = DestinationKind.DICOM
    module: ClassVar[str] = "node.archives.dimse"

    @model_validator(mode="after")
    def _tls_keys(self) -> DicomDestination:
        tls_keys = [k for k in ("tls_ca", "tls_certificate", "tls_key", "tls_key_password_env",
                                "tls_server_name") if getattr(self, k)]
        if tls_keys and not self.tls:
            raise ValueError(f'destination "{self.name}": {", ".join(tls_keys)} given but '
                             "tls = false: set tls = true")
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError(f'destination "{self.name}": give tls_certificate and tls_key '
                             "together")
        return self


class DicomWebDestination(_Destination):
    """``[[destinations]]`` with ``kind = "dicomweb"``: a DICOMweb server (PS3.18), by its
    service root ``url`` (e.g. ``https://pacs.example.org/dicom-web``)."""

    url: str = Field(pattern=r"^https?://.+$", description="the DICOMweb service root")
    username: str = Field("", description='HTTP basic auth user; "" = none')
    password_env: str = Field(
        "", pattern=_ENV_NAME,
        description="the environment variable that holds the basic auth password",
    )
    token_env: str = Field(
        "", pattern=_ENV_NAME,
        description="the environment variable that holds a bearer token (instead of basic)",
    )
    timeout_s: float = Field(30.0, gt=0)
    kind: Literal[DestinationKind.DICOMWEB]
    module: ClassVar[str] = "node.archives.dicomweb"

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebDestination:
        if self.token_env and (self.username or self.password_env):
            raise ValueError(f'destination "{self.name}": give token_env or username and '
                             "password_env, not both")
        return self


_PEER_KEYS = ("ae_title", "host", "port")


def _destination_kind(value: Any) -> str | None:
    """A ``[[destinations]]`` entry's kind: its ``kind``, else what its keys say (``url``: an
    Orthanc; ``ae_title``, ``host``, ``port``: a DICOM peer)."""
    if not isinstance(value, dict):
        return getattr(value, "kind", None)
    if "kind" in value:
        return str(value["kind"])
    if value.get("url") and not any(value.get(k) for k in _PEER_KEYS):
        return DestinationKind.ORTHANC.value
    if not value.get("url") and any(value.get(k) for k in _PEER_KEYS):
        return DestinationKind.DICOM.value
    return None


Destination = Annotated[
    Annotated[OrthancDestination, Tag(DestinationKind.ORTHANC.value)]
    | Annotated[DicomDestination, Tag(DestinationKind.DICOM.value)]
    | Annotated[DicomWebDestination, Tag(DestinationKind.DICOMWEB.value)],
    Discriminator(_destination_kind, custom_error_type="destination_kind",
                  custom_error_message='give kind ("orthanc", "dicom", "dicomweb"), or url (an '
                                       "Orthanc), or ae_title, host and port (a DICOM peer), "
                                       "not both"),
]
"""One ``[[destinations]]`` entry: a member by its kind."""


class DeidOutput(StrEnum):
    """The IOD of de-identified outputs."""

    SOURCE = "source"
    """The source's own IOD (what research PACS users expect)."""

    SC = "sc"
    """A Secondary Capture built by the SC writer."""


class PixelFill(StrEnum):
    """How hidden pixels (burned-in text) are filled."""

    BLACK = "black"
    """The value that displays black whatever the window."""

    INPAINT = "inpaint"
    """Blanked, then regenerated anatomy from the generation stage's inpainting model."""


DEFAULT_TEXT_ALLOWLIST = (
    # laterality and markers
    "L", "R", "LT", "RT", "LEFT", "RIGHT", "BIL", "BILAT", "BILATERAL",
    # projections, views and positioning
    "AP", "PA", "LAT", "LATERAL", "LL", "RL", "OBL", "OBLIQUE", "LAO", "RAO", "LPO", "RPO",
    "CC", "MLO", "ML", "LM", "XCCL", "SUPINE", "PRONE", "ERECT", "UPRIGHT", "STANDING",
    "SITTING", "DECUB", "DECUBITUS", "PORTABLE", "PORT", "SEMI", "SEMIERECT", "INSP", "EXP",
    "FLEX", "EXT", "WB", "AXIAL", "AX", "SAG", "COR", "CORONAL", "SAGITTAL", "TRANSVERSE",
    "TRV", "LONG", "SUP", "INF", "ANT", "POST", "MED", "H", "A", "P",
    # ruler and scale labels: units and short numbers (never three numbers in one line)
    "CM", "MM", r"\d{1,3}", r"\d{1,3}(CM|MM)",
)
"""Tokens (regular expressions over whole tokens, case-insensitive) that burned-in text may
keep: laterality, view and positioning words, ruler and scale labels. None identifies anyone;
a token that equals one of the source's own identifying values is hidden all the same."""


class PixelRule(_Section):
    """``[[deid.pixel_rules]]``: where an imaging device burns text into its pixels (the idea
    of CTP's DicomPixelAnonymizer signatures). Every given criterion must match."""

    name: str = Field(min_length=1, max_length=64)
    manufacturer: str = Field("", description="regular expression on Manufacturer")
    model: str = Field("", description="regular expression on Manufacturer's Model Name")
    sop_class: list[str] = Field(default_factory=list, description="SOP Class UIDs; [] = any")
    rows: int | None = Field(None, ge=1)
    columns: int | None = Field(None, ge=1)
    regions: list[tuple[int, int, int, int]] = Field(
        min_length=1, description="rectangles to blank: [x (column), y (row), width, height]"
    )
    fill: PixelFill = Field(PixelFill.BLACK,
                            description='"black", or "inpaint" (generated anatomy; the '
                                        "generation stage provides it)")


class DeidSettings(_Section):
    """``[deid]``: de-identification (PS3.15 Annex E, Basic Profile plus options)."""

    output: DeidOutput = DeidOutput.SOURCE
    honest_broker_file: Path | None = Field(
        None, description="append each instance's original -> new patient ID, name and UIDs "
        "here, one JSON line each (mode 0600); no = none"
    )
    burned_in_modalities: list[str] = Field(
        default_factory=lambda: ["US", "SC", "XC", "ES"],
        description="where text detection is off: modalities that burn text into pixels, "
                    "whose images are quarantined without a matching pixel rule",
    )
    quarantine_unmatched_burned_in: bool = Field(
        True, description="false: pass such images on, marked Burned In Annotation YES"
    )
    pixel_rules: list[PixelRule] = Field(default_factory=list)
    detect_text: bool = Field(
        True, description="find text burned into every image (OCR, offline) and hide it"
    )
    detect_text_skip_modalities: list[str] = Field(
        default_factory=list,
        description="modalities whose images are not searched for text (their pixels then "
                    "follow pixel_rules and burned_in_modalities alone)",
    )
    text_allowlist: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEXT_ALLOWLIST),
        description="tokens burned-in text may keep (regular expressions over whole tokens, "
                    "case-insensitive); text matching the source's identifiers is hidden anyway",
    )
    text_fill: PixelFill = Field(PixelFill.BLACK, description="how hidden text is filled")
    verify_text: bool = Field(
        True, description="search cleaned images again; release only when no text is left "
                          "(false: never Burned In Annotation NO)",
    )
    text_max_area: float = Field(
        0.3, gt=0, le=1, description="an image whose text covers more than this fraction is "
                                     "quarantined (a scanned document) instead of blanked",
    )

    key: str = Field(
        "", description="secret for pseudonyms and UID remapping: SYNTHNODE__DEID__KEY"
    )

    @property
    def needs_inpainter(self) -> bool:
        """Whether a pixel rule fills with generated anatomy (the generation stage)."""
        return self.text_fill is PixelFill.INPAINT or any(
            rule.fill is PixelFill.INPAINT for rule in self.pixel_rules)
    options: list[DeidOption] = Field(default_factory=list)
    date_shift_max_days: int = Field(
        365, ge=1, le=3650, description="modified dates move back 1..N days, per patient"
    )
    safe_private: list[str] = Field(
        default_factory=list,
        description='private attributes kept with retain_safe_private: "CREATOR:gggg,ee" '
        "(odd group, element offset within the creator's block)",
    )

    @field_validator("options")
    @classmethod
    def _consistent(cls, value: list[DeidOption]) -> list[DeidOption]:
        return check_options(value)

    @field_validator("safe_private")
    @classmethod
    def _private_spec(cls, value: list[str]) -> list[str]:
        for item in value:
            m = re.fullmatch(r"([^:]{1,64}):([0-9A-Fa-f]{4}),([0-9A-Fa-f]{2})", item)
            if not m or int(m[2], 16) % 2 == 0:
                raise ValueError(f'"{item}" is not CREATOR:gggg,ee with an odd group gggg '
                                 '(e.g. "ACME 1.0:0009,10")')
        return value


class WeightsDtype(StrEnum):
    """The torch dtype the diffusion models' weights are loaded in (``[generate] dtype``)."""

    AUTO = "auto"
    """bfloat16 on a CUDA GPU that supports it, else float16 on a GPU; float32 on the CPU."""

    FLOAT32 = "float32"
    """Full precision: the CPU's (half precision is slow or unsupported there)."""

    FLOAT16 = "float16"
    """Half precision (a GPU)."""

    BFLOAT16 = "bfloat16"
    """Half precision with float32's range (recent GPUs)."""


class GenerateSettings(_Section):
    """``[generate]``: the diffusion models that make synthetic counterparts."""

    model: str = Field(
        "tiny",
        description='"tiny" (an untrained model built locally on first use: for tests and '
                    "trying the node), a local diffusers folder, a single-file checkpoint "
                    "(.safetensors, .ckpt), or a hub id",
    )
    inpaint_model: str = Field(
        "", description='"" = the "inpaint" subfolder of a local model, else the model itself'
    )
    cache_dir: Path = Path("var/models")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: WeightsDtype = WeightsDtype.AUTO
    resolution: int = Field(
        0, ge=0, le=2048, description="model resolution in px (multiple of 8); 0 = the model's own"
    )
    steps: int = Field(30, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0, le=50)
    scheduler: str = Field(
        "DDIMScheduler", pattern=r"^[A-Za-z0-9]+Scheduler$",
        description="a diffusers scheduler class name",
    )
    batch_size: int = Field(4, ge=1, le=256)
    compile: bool = Field(
        True, description="on CUDA, torch.compile the UNet and the VAE decoder (faster after a "
                          "minute's compiling per new shape, once per worker); false = eager",
    )
    strength: float = Field(0.6, gt=0, le=1, description="img2img: how far from the source")
    negative_prompt: str = ""
    prompt_templates: dict[str, str] = Field(
        default_factory=lambda: {
            "default": "An X-ray of the {BodyPartExamined}",
            "CT": "A CT image of the {BodyPartExamined}",
            "MR": "An MRI of the {BodyPartExamined}",
        },
        description="text2img prompt per Modality, over the source's attributes (keywords)",
    )
    single_file_config: str = Field(
        "", description="a single-file checkpoint (.safetensors, .ckpt) as model: a local "
                        "diffusers folder holding its component configs (\"\" = diffusers' "
                        "own guess, which needs its config cache)",
    )
    copy_check: bool = Field(
        True, description="refuse synthetic outputs that are near copies of a training image "
                          "(on whenever the model folder has a training-set index)",
    )
    copy_feature_threshold: float = Field(
        0.99, gt=0, le=1, description="copy check: refuse at this centred cosine similarity "
                                      "to the nearest training image in the feature space "
                                      "(calibration: node/generate/copycheck.py)",
    )
    copy_hash_threshold: float = Field(
        0.95, gt=0, le=1, description="copy check: refuse at this perceptual-hash similarity "
                                      "(1 - Hamming distance / bits) to a training image",
    )
    copy_features: str = Field(
        "", description='copy check and evaluate feature space: "" = the model\'s own VAE '
                        "encoder; or a local TorchScript file mapping (N, 3, H, W) in [0, 1] "
                        "to (N, D) embeddings (e.g. a chest X-ray DenseNet)",
    )
    evaluate_features: list[str] = Field(
        default_factory=list,
        description="synthnode model evaluate: more feature spaces for FID, each a local "
                    "TorchScript file (e.g. Inception v3, a chest X-ray DenseNet, a CLIP image "
                    "tower) mapping (N, 3, H, W) in [0, 1] to (N, D); nothing is downloaded",
    )


class QueueBackend(StrEnum):
    """Where the job queues and job states live (Huey storage)."""

    SQLITE = "sqlite"
    """A SQLite file on this machine: no server (the embedded default)."""

    REDIS = "redis"
    """A Redis server: workers on several machines share the queues."""


class JobsSettings(_Section):
    """``[jobs]``: the durable queues between the spool and the workers (Huey), and the job
    states the node keeps beside them (pending, running with a heartbeat, done, dead)."""

    backend: QueueBackend = QueueBackend.SQLITE
    sqlite_file: Path = Field(Path("var/queue.sqlite3"), description="backend sqlite")
    redis_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^rediss?://",
                           description="secret when it holds a password (backend redis): "
                                       "set it in SYNTHNODE__JOBS__REDIS_URL")
    name: str = Field("synthnode", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                      description="queue name prefix: several nodes may share one backend")
    cpu_workers: int = Field(2, ge=0, le=64, description="processes serve starts for the cpu "
                             "queue (de-identify, forward); 0 = run them elsewhere")
    gpu_workers: int = Field(1, ge=0, le=16, description="processes serve starts for the gpu "
                             "queue (generation); 0 = run them elsewhere")
    max_attempts: int = Field(12, ge=1, le=100, description="tries of a job before dead-letter")
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    heartbeat_s: float = Field(2.0, gt=0, description="a running job's heartbeat period")
    heartbeat_timeout_s: float = Field(
        20.0, gt=0, description="a running job silent this long has lost its worker: retried"
    )
    work_dir: Path = Field(Path("var/work"), description="outputs staged before dispatch")
    keep_done_s: float = Field(7 * 86400.0, ge=0, description="job records kept after done "
                               "(with a done job's outputs of series a reviewer rejected)")
    keep_rejected_s: float = Field(
        30 * 86400.0, ge=0, description="a rejected job's staged outputs (a forward's: copies "
        "of the originals) and its record kept this long after the decision, then removed")


class Queue(StrEnum):
    """A job queue: the workers serving it run its tasks (``synthnode worker --queue``)."""

    CPU = "cpu"
    """De-identification and forwarding (``[jobs] cpu_workers``)."""

    GPU = "gpu"
    """Generation with the diffusion models (``[jobs] gpu_workers``)."""


class TaskKind(StrEnum):
    """What a rule's task makes of the matched series (the synthesis tasks also name how a
    synthetic output was made, in its provenance)."""

    DEIDENTIFY = "deidentify"
    """De-identified counterparts (``[deid]``), every instance."""

    TEXT2IMG = "text2img"
    """Synthetic images from a prompt (the template for the series' modality by default)."""

    INPAINT = "inpaint"
    """Regions of every image regenerated, the rest kept."""

    OUTPAINT = "outpaint"
    """Every image extended by margins."""

    IMG2IMG = "img2img"
    """A variation of every image."""

    FORWARD = "forward"
    """The original instances, unchanged (to a research PACS that may hold them)."""

    @property
    def synthetic(self) -> bool:
        """Whether it makes synthetic images (a diffusion model: text2img, inpaint, outpaint,
        img2img)."""
        return self in SYNTHESIS_TASKS

    @property
    def uses_source_pixels(self) -> bool:
        """Whether its outputs keep or derive from the source's pixels (all but text2img)."""
        return self is not TaskKind.TEXT2IMG

    @property
    def inpaints(self) -> bool:
        """Whether it runs the inpainting model (inpaint, outpaint)."""
        return self in (TaskKind.INPAINT, TaskKind.OUTPAINT)

    @property
    def queue(self) -> Queue:
        """The queue whose workers run it: gpu for generation, cpu otherwise."""
        return Queue.GPU if self.synthetic else Queue.CPU


SYNTHESIS_TASKS = frozenset({TaskKind.TEXT2IMG, TaskKind.INPAINT, TaskKind.OUTPAINT,
                             TaskKind.IMG2IMG})
"""The tasks that make synthetic images (the generation stage's, on the gpu queue)."""


class RuleTask(_Section):
    """``[[rules.tasks]]``: one task of a rule, run on every series the rule matched."""

    task: TaskKind
    destinations: list[str] | None = Field(
        None, description='where results go: "orthanc" or [[destinations]] names; '
                          "None = the rule's"
    )
    prompt: str = Field("", description='text2img/inpaint/outpaint/img2img; "" = the template '
                                        "for the modality")
    negative_prompt: str | None = None
    regions: list[tuple[int, int, int, int]] = Field(
        default_factory=list, description="inpaint: rectangles [x, y, width, height] in px"
    )
    margins: tuple[int, int, int, int] = Field(
        (0, 0, 0, 0), description="outpaint: px added at [top, right, bottom, left]"
    )
    strength: float | None = Field(None, gt=0, le=1, description="img2img; None = [generate]")
    seed: int = Field(0, ge=0)
    num: int = Field(1, ge=1, le=64, description="text2img: images per series")
    series_description: str = Field("", max_length=64, description='"" = a default per task')
    series_number: int | None = Field(None, ge=0)
    deidentified_source: bool = Field(
        True, description="generation works on the de-identified source, so outputs carry "
                          "the pseudonym and never the patient's identity"
    )
    options: list[DeidOption] | None = Field(
        None, description="de-identification options for this task (a mirror's profile); "
                          "None = [deid] options"
    )
    review: bool = Field(False, description="outputs are staged and delivered only after a "
                                            "reviewer approves them (synthnode review)")

    @field_validator("options")
    @classmethod
    def _consistent(cls, value: list[DeidOption] | None) -> list[DeidOption] | None:
        return None if value is None else check_options(value)

    @field_validator("margins")
    @classmethod
    def _non_negative(cls, value: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        if min(value) < 0:
            raise ValueError("margins are pixels >= 0")
        return value


class RuleMatch(_Section):
    """``[rules.match]``: every criterion given must hold for a series (empty = any series).
    Lists match any of their values (case-insensitive); strings are regular expressions
    searched in the value (case-insensitive)."""

    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list, description="BodyPartExamined")
    sop_class: list[str] = Field(default_factory=list, description="SOP Class UIDs")
    study_description: str = Field("", description="regular expression")
    series_description: str = Field("", description="regular expression")
    calling_aet: list[str] = Field(default_factory=list, description="the sender's AE title")
    called_aet: list[str] = Field(default_factory=list, description="the AE title it called")
    source: list[str] = Field(
        default_factory=list,
        description='how the study came: "dicom" (C-STORE to the node), "orthanc" (handed over '
                    'by the plugin), "backfill" (synthnode mirror backfill)',
    )

    @field_validator("source")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in ("dicom", "orthanc", "backfill")]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a source is dicom, orthanc or backfill")
        return value
    tags: dict[str, str] = Field(
        default_factory=dict, description="any attribute by keyword: regular expression"
    )

    @field_validator("study_description", "series_description")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f'"{value}" is not a regular expression ({exc})') from None
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        from pydicom.datadict import tag_for_keyword

        for keyword, pattern in value.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f'"{keyword}" is not a DICOM keyword (e.g. "Manufacturer")')
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f'{keyword}: "{pattern}" is not a regular expression '
                                 f"({exc})") from None
        return value


class Rule(_Section):
    """``[[rules]]``: which series (``match``) get which tasks, and where the results go."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    match: RuleMatch = RuleMatch()
    tasks: list[RuleTask] = Field(min_length=1)
    destinations: list[str] = Field(
        default_factory=lambda: ["orthanc"],
        description='"orthanc" (the [orthanc] REST API) or [[destinations]] names',
    )


class RouteMode(StrEnum):
    """How many rules apply to a series."""

    FIRST = "first"
    """The first rule (in file order) that matches a series applies; the others don't."""

    ALL = "all"
    """Every rule that matches a series applies."""


class RouteSettings(_Section):
    """``[route]``: how ``[[rules]]`` are applied."""

    mode: RouteMode = RouteMode.ALL


def default_rules() -> list[Rule]:
    """Used when the configuration has no ``rules`` key: de-identify every study, and make a
    synthetic counterpart (img2img of the de-identified image) of every CR and DX series."""
    return [
        Rule(name="deidentify-all", tasks=[RuleTask(task=TaskKind.DEIDENTIFY)]),
        Rule(name="synthetic-radiographs", match=RuleMatch(modality=["CR", "DX"]),
             tasks=[RuleTask(task=TaskKind.IMG2IMG)]),
    ]


class ConsoleSettings(_Section):
    """``[console]``: the operator console that ``serve`` runs on a port of its own: web pages,
    ``/metrics`` (Prometheus), ``/healthz``, ``/readyz`` and STOW-RS ingest."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1,
                      description="localhost only by default; put a TLS reverse proxy or "
                                  "tls_certificate in front before opening it wider")
    port: int = Field(8090, ge=1, le=65535)
    tls_certificate: Path | None = Field(None, description="PEM; with tls_private_key: HTTPS")
    tls_private_key: Path | None = None
    db: Path = Field(Path("var/console.sqlite3"),
                     description="users, sessions and the overview's samples")
    session_timeout_s: float = Field(8 * 3600.0, gt=0, description="a login lasts this long")
    trusted_user_header: str = Field(
        "", pattern=r"^[A-Za-z0-9-]{0,64}$",
        description='single sign-on: the header a reverse proxy names the user in (e.g. '
                    '"X-Remote-User"); the user must exist (synthnode user add); "" = off')
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="addresses whose trusted_user_header is believed")
    trusted_proxy_secret_env: str = Field(
        "", pattern=_ENV_NAME,
        description="the environment variable holding the secret the proxy sends in "
                    "X-Synthnode-Proxy-Secret (at least 16 characters); needed with "
                    "trusted_user_header: without it any process on a trusted address, any "
                    "local user's, could name any user")
    sample_interval_s: float = Field(60.0, gt=0, description="overview charts: one sample per")
    history_h: float = Field(24.0, gt=0, description="overview charts: hours kept and shown")
    stow_max_bytes: int = Field(4 * 1024**3, gt=0,
                                description="largest STOW-RS request body accepted")

    @model_validator(mode="after")
    def _proxy_secret(self) -> ConsoleSettings:
        if self.trusted_user_header and not self.trusted_proxy_secret_env:
            raise ValueError("[console] trusted_user_header needs trusted_proxy_secret_env: the "
                             "environment variable holding a secret your proxy sends in "
                             "X-Synthnode-Proxy-Secret (else any process on a trusted address "
                             "could name any user)")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsoleSettings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together")
        return self


class AuditSettings(_Section):
    """``[audit]``: the append-only, hash-chained audit trail (associations, job states,
    releases, reviews, quarantines, logins, config loads); never patient data."""

    enabled: bool = True
    db: Path = Path("var/audit.sqlite3")


class LogSettings(_Section):
    """``[log]``: logs carry UIDs, AE titles and job ids, never names, IDs, dates or free text."""

    level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")


class Settings(_Section):
    """All settings of a node."""

    node: NodeSettings = NodeSettings()
    spool: SpoolSettings = SpoolSettings()
    orthanc: OrthancSettings = OrthancSettings()
    output: OutputSettings = OutputSettings()
    dispatch: DispatchSettings = DispatchSettings()
    deid: DeidSettings = DeidSettings()
    generate: GenerateSettings = GenerateSettings()
    destinations: list[Destination] = Field(default_factory=list)
    jobs: JobsSettings = JobsSettings()
    route: RouteSettings = RouteSettings()
    rules: list[Rule] = Field(default_factory=default_rules)
    console: ConsoleSettings = ConsoleSettings()
    audit: AuditSettings = AuditSettings()
    log: LogSettings = LogSettings()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique: {names}")
        if ORTHANC in names:
            raise ValueError(f'the destination name "{ORTHANC}" is [orthanc]\'s: name this one '
                             "otherwise")
        return value

    @model_validator(mode="after")
    def _rules_consistent(self) -> Settings:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        known = set(self._named)
        for rule in self.rules:
            for target in [*rule.destinations,
                           *(t for task in rule.tasks for t in task.destinations or ())]:
                if target not in known:
                    raise ValueError(f'rule "{rule.name}": destination "{target}" is neither '
                                     f'"orthanc" nor a [[destinations]] name '
                                     f"(known: {', '.join(sorted(known))})")
        return self

    @property
    def _named(self) -> dict[str, Destination]:
        # [orthanc] is the destination named "orthanc", first of all
        orthanc = OrthancDestination(name=ORTHANC, url=self.orthanc.url,
                                     username=self.orthanc.username)
        return {ORTHANC: orthanc, **{d.name: d for d in self.destinations}}

    @property
    def all_destinations(self) -> list[Destination]:
        """Every destination: "orthanc" (``[orthanc]``) first, then ``[[destinations]]``."""
        return list(self._named.values())

    def orthanc_named(self, name: str) -> OrthancSettings:
        """The REST settings of the Orthanc called ``name`` ("orthanc" or "": ``[orthanc]``);
        KeyError for an unknown name, ValueError for another kind."""
        if name in ("", ORTHANC):
            return self.orthanc
        destination = self.destination(name)
        if not isinstance(destination, OrthancDestination):
            raise ValueError(f'"{name}" is a {destination.kind.value} destination, not an '
                             "Orthanc (url)")
        return destination.orthanc_settings(self.orthanc)

    def destination(self, name: str) -> Destination:
        """The destination called ``name`` ("orthanc": ``[orthanc]``); KeyError naming the
        known ones otherwise."""
        found = self._named.get(name)
        if found is not None:
            return found
        known = ", ".join(self._named)
        raise KeyError(f'no destination "{name}" (known: {known})')


class ConfigError(Exception):
    """The configuration is unusable; the message names the file, the key, the value and what
    is allowed, one problem per line."""


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment: {name} conflicts with another variable")
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _table_of(annotation: Any) -> tuple[Any, bool]:
    """The model a field holds as a table, or lists as an array of tables (then True); for a
    tagged union of models, a dict of them by tag."""
    if get_origin(annotation) is Annotated:
        inner = get_args(annotation)[0]
        members = get_args(inner) if get_origin(inner) in (UnionType, Union) else ()
        tagged = {str(m.tag): get_args(a)[0] for a in members if get_origin(a) is Annotated
                  for m in get_args(a)[1:] if isinstance(m, Tag)}
        if tagged:
            return tagged, False
        return _table_of(inner)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is list and args:
        inner, _ = _table_of(args[0])
        return inner, inner is not None
    if get_origin(annotation) in (UnionType, Union) and len(args) == 1:
        return _table_of(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _entry(item: Any, index: int) -> str:
    """An entry of an array of tables as a user finds it in the file: by its name (rules,
    destinations, pixel rules) or task, and its 1-based place."""
    place = _ordinal(index + 1)
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        return f'"{item["name"]}" ({place})'
    if isinstance(item, dict) and isinstance(item.get("task"), str):
        return f"({place}, {item['task']})"
    return f"({place})"


class _Place(NamedTuple):
    text: str  # '[[rules]] "ct-deid" (3rd) match.modalty'
    owner: type[BaseModel] | None  # the table the last key belongs to (its allowed keys)
    field: Any  # the last key's FieldInfo; None where unknown
    is_table: bool  # the place is a whole table (its input: every key in it)


def _locate(loc: tuple[Any, ...], data: Any, model: type[BaseModel]) -> _Place:
    """Where a validation error is, in the file's own terms: ``[deid] key``, ``[[rules]]
    "ct-deid" (3rd) match.modalty``, ``[[rules]] "r" (1st) tasks (2nd, img2img).strength``
    (entries by name and 1-based place, not pydantic's ``rules.2``)."""
    keys: list[str] = []  # dotted path, entries appended to their list's key
    header = 0  # how many leading keys are tables named in a [header] / [[header]]
    first_entry = ""
    table: Any = model  # the table the next key is in
    listed: Any = None  # the entries' model when the next part is an index
    owner: type[BaseModel] | None = model
    field: Any = None
    node = data
    for part in loc:
        if isinstance(table, dict):  # a tagged union's member, by the tag pydantic puts first
            table = owner = table.get(str(part))
            continue
        if isinstance(part, int) and listed is not None:
            item = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            if not first_entry and header == len(keys):
                first_entry = _entry(item, part)
            else:
                keys[-1] += f" {_entry(item, part)}"
            table, listed, node = listed, None, item
            continue
        owner, listed = table, None
        field = table.model_fields.get(str(part)) if table is not None else None
        keys.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
        table, is_list = _table_of(field.annotation) if field is not None else (None, False)
        if is_list:
            table, listed = None, table
        if (table is not None or listed is not None) and header == len(keys) - 1 and (
                not first_entry):
            header += 1
    if first_entry:
        text = f"[[{'.'.join(keys[:header])}]] {first_entry}"
        rest = keys[header:]
    elif keys and (table is not None or len(keys) > 1):
        text, rest = f"[{keys[0]}]", keys[1:]
    elif len(keys) == 1 and listed is not None:
        text, rest = f"[[{keys[0]}]]", []
    else:
        text, rest = ".".join(keys), []
    if rest:
        text += " " + ".".join(rest)
    return _Place(text, owner, field, table is not None)


def _describe(error: dict[str, Any], source: str, model: type[BaseModel], data: Any) -> str:
    loc = tuple(error["loc"])
    where, owner, field, is_table = _locate(loc, data, model)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            allowed = ", ".join(f"[{s}]" for s in model.model_fields)
            return f"{source}: [{loc[0]}]: unknown section (allowed: {allowed})"
        allowed = ", ".join(owner.model_fields) if owner is not None else ""
        return f"{source}: {where}: unknown key (allowed: {allowed})"
    if not loc:  # a check across sections: its input is the whole file (secrets included)
        return f"{source}: {message}"
    if error["type"] == "missing":
        return f"{source}: {where}: required key missing"
    value = error.get("input")
    if is_table:  # a check across a table's keys: its input is the whole table
        return f"{source}: {where}: {message}"
    if field is not None and str(field.description or "").startswith("secret"):
        return f"{source}: {where} (a secret, not shown): {message}"
    return f"{source}: {where} = {value!r}: {message}"


def _local_model(spec: str, base_dir: Path) -> str:
    """A model given as a folder or file relative to the config file becomes absolute; "tiny",
    hub ids and absolute paths stay as they are."""
    if spec and spec != "tiny" and not Path(spec).is_absolute():
        try:
            if (base_dir / spec).exists():
                return str(base_dir / spec)
        except OSError:  # a name the file system cannot hold (too long): not a folder here
            pass
    return spec


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Read, merge and validate the settings; raise :class:`ConfigError` naming every problem."""
    environ = dict(os.environ if environ is None else environ)
    if path is None and environ.get(ENV_CONFIG):
        path = environ[ENV_CONFIG]
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "defaults"
    if path is not None:
        file = Path(path)
        source = str(file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such configuration file") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot be read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML ({exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start} is not valid UTF-8): "
                              "save it as UTF-8") from None
        except RecursionError:  # tomllib recurses into nested arrays and inline tables
            raise ConfigError(f"{file}: not valid TOML (arrays or tables nested too "
                              "deeply)") from None
        base_dir = file.resolve().parent
    overrides = _env_overrides(environ)
    if overrides:
        data = _merge(data, overrides)
        source = f"{source} + environment {ENV_PREFIX}*" if path is not None else "environment"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, source, Settings, data)  # type: ignore[arg-type]
                 for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base_dir / path

    def resolve_opt(path: Path | None) -> Path | None:
        return None if path is None else resolve(path)

    tls = settings.node.tls
    if tls is not None:
        tls = tls.model_copy(update={
            "certificate": resolve(tls.certificate), "private_key": resolve(tls.private_key),
            "ca_file": resolve_opt(tls.ca_file),
        })
    destinations = [d.model_copy(update={
        "tls_ca": resolve_opt(d.tls_ca), "tls_certificate": resolve_opt(d.tls_certificate),
        "tls_key": resolve_opt(d.tls_key),
    }) if isinstance(d, DicomDestination) else d for d in settings.destinations]
    broker = settings.deid.honest_broker_file
    return settings.model_copy(
        update={
            "node": settings.node.model_copy(update={"tls": tls}),
            "destinations": destinations,
            "spool": settings.spool.model_copy(update={"dir": resolve(settings.spool.dir)}),
            "output": settings.output.model_copy(
                update={"quarantine_dir": resolve(settings.output.quarantine_dir)}
            ),
            "jobs": settings.jobs.model_copy(update={
                "sqlite_file": resolve(settings.jobs.sqlite_file),
                "work_dir": resolve(settings.jobs.work_dir),
            }),
            "deid": settings.deid.model_copy(
                update={"honest_broker_file": resolve(broker) if broker else None}
            ),
            "console": settings.console.model_copy(update={
                "db": resolve(settings.console.db),
                "tls_certificate": resolve_opt(settings.console.tls_certificate),
                "tls_private_key": resolve_opt(settings.console.tls_private_key),
            }),
            "audit": settings.audit.model_copy(update={"db": resolve(settings.audit.db)}),
            "generate": settings.generate.model_copy(
                update={
                    "cache_dir": resolve(settings.generate.cache_dir),
                    "model": _local_model(settings.generate.model, base_dir),
                    "inpaint_model": _local_model(settings.generate.inpaint_model, base_dir),
                    "single_file_config": _local_model(settings.generate.single_file_config,
                                                       base_dir),
                }
            ),
        }
    )
