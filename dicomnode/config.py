"""Typed settings for the node: a YAML file plus ``DICOMNODE_*`` environment overrides.

Precedence, highest first: keyword arguments, environment variables, the YAML file
(``--config`` or ``DICOMNODE_CONFIG``), the embedded defaults below (which are the same
as ``config/node.yaml``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
#: Bounds of ``max_pdu``: dcmtk's smallest, and 16 MiB (the node buffers one PDU per
#: association, a few times over while it decodes it).
MIN_PDU, MAX_PDU = 4096, 2**24


def _check_ae_title(value: str, name: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value) or len(value) > 16:
        raise ValueError(
            f"Invalid '{name}' value '{value}' - an AE title is 1 to 16 printable ASCII "
            "characters without backslash"
        )
    return stripped


#: The port IANA registered for DICOM over TLS (PS3.15 B.1: "dicom-tls").
DICOM_TLS_PORT = 2762


def _check_file(value: Path | None, name: str) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"Invalid '{name}' value '{value}' - no such file")
    return value


class ListenerTls(BaseModel):
    """DICOM TLS (PS3.15 Annex B) on a second listening port (``tls`` in the config).

    The node's certificate and key identify it to senders; ``ca_certificates`` is the
    CA bundle that senders' certificates must chain to (mutual authentication).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    port: int = Field(default=DICOM_TLS_PORT, ge=0, le=65535, description=(
        "Listening port for DICOM over TLS (2762, IANA's dicom-tls); beside `port`, or "
        "alone when `port` is null."))
    certificate: Path = Field(description="The node's certificate chain (PEM), leaf first.")
    private_key: Path = Field(description="The certificate's private key (PEM, unencrypted).")
    ca_certificates: Path | None = Field(default=None, description=(
        "CA certificates (PEM) that senders' certificates must chain to; a sender that "
        "presents a certificate not issued by them is refused."))
    require_client_certificate: bool = Field(
        default=False, alias="require_client_cert", description=(
            "Refuse a sender that presents no certificate (mutual authentication); needs "
            "ca_certificates."))

    @field_validator("certificate", "private_key", "ca_certificates")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _check_file(v, f"tls.{info.field_name}")

    @model_validator(mode="after")
    def _mutual(self) -> ListenerTls:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "Invalid 'tls.require_client_certificate' value 'True' - senders' "
                "certificates can only be checked against tls.ca_certificates; set it")
        return self


class PeerTls(BaseModel):
    """DICOM TLS for sending results to one peer (``peers.X.tls``, ``destinations.X.tls``).

    The peer's certificate must chain to ``ca_certificates`` (the system's CAs when
    unset) and, with ``check_hostname``, name ``host``. ``certificate`` and
    ``private_key`` are the node's own, for a peer that requires client certificates.
    """

    model_config = ConfigDict(extra="forbid")

    ca_certificates: Path | None = Field(default=None, description=(
        "CA certificates (PEM) the peer's certificate must chain to; None: the system's."))
    certificate: Path | None = Field(default=None, description=(
        "The node's certificate (PEM), sent when the peer asks for one."))
    private_key: Path | None = Field(default=None, description="Its private key (PEM).")
    check_hostname: bool = Field(default=True, description=(
        "The peer's certificate must name `host` (DNS name or IP address)."))

    @field_validator("certificate", "private_key", "ca_certificates")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _check_file(v, f"tls.{info.field_name}")

    @model_validator(mode="after")
    def _pair(self) -> PeerTls:
        if (self.certificate is None) != (self.private_key is None):
            missing = "private_key" if self.private_key is None else "certificate"
            raise ValueError(f"Invalid 'tls.{missing}' value 'None' - a client certificate "
                             "needs both certificate and private_key")
        return self


class Peer(BaseModel):
    """A DICOM peer that results can be sent to."""

    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str | None = Field(
        default=None, description="Called AE title; defaults to the peer table key."
    )
    tls: PeerTls | None = Field(default=None, description="Send over DICOM TLS.")


class Destination(BaseModel):
    """A further destination for results, by name in ``destinations``."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    pipelines: list[str] | None = Field(
        default=None, description="Only results of these pipelines; None means all."
    )
    tls: PeerTls | None = Field(default=None, description="Send over DICOM TLS.")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v, "ae_title")


class CompletionSettings(BaseModel):
    """When a study counts as complete (see ``workflow/completion.py``)."""

    quiet_period_s: float = Field(default=10.0, gt=0)
    on_association_release: bool = Field(
        default=True,
        description="Complete at association release when every series is contiguous.",
    )
    expected_count: bool = Field(
        default=True, description="Complete when Images in Acquisition is reached."
    )
    min_slices: int = Field(default=3, ge=1, description="Contiguity needs at least this many.")
    poll_interval_s: float = Field(default=0.5, gt=0)


class ExportSettings(BaseModel):
    """Outbox behaviour (see ``workflow/export.py``)."""

    return_to_sender: bool = True
    max_attempts: int = Field(default=12, ge=1)
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)


class CelerySettings(BaseModel):
    """Jobs on Celery workers (``executor: celery``; see ``workflow/distributed.py``)."""

    model_config = ConfigDict(extra="forbid")

    queue: str = Field(default="jobs", description=(
        "The queue of routing and non-urgent pipeline jobs."))
    urgent_queue: str = Field(default="urgent", description=(
        "The queue of urgent jobs; every worker takes it first unless told otherwise."))
    requeue_after_s: float = Field(default=300.0, gt=0, description=(
        "The node publishes a job again when it is still queued this long after it was "
        "published (the broker lost it); a second message for a job is harmless."))
    max_attempts: int = Field(default=3, ge=1, description=(
        "A job whose worker died this many times (it was delivered again each time) is "
        "recorded as failed instead of being run again."))
class Webhook(BaseModel):
    """One HTTP endpoint told of urgent positive studies (see ``workflow/notify.py``)."""

    url: str = Field(description="Where the JSON is POSTed (http:// or https://).")
    headers: dict[str, str] = Field(default_factory=dict, description=(
        "Extra request headers (an Authorization token); never logged or shown."))
    pipelines: list[str] | None = Field(default=None, description=(
        "Positive results of these pipelines, whatever their priority; None: every "
        "positive result of an urgent routing rule."))
    include_patient: bool = Field(default=False, description=(
        "Put the patient's name, ID and birth date in the payload (off: UIDs, the "
        "accession number and findings only)."))

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Invalid 'notify.webhooks.url' value '{v}' - an http:// or "
                             "https:// URL with a host")
        return v


class NotifySettings(BaseModel):
    """Urgent notifications: where they go and how they are retried."""

    webhooks: list[Webhook] = Field(default_factory=list)
    dashboard_url: str = Field(default="http://127.0.0.1:8080", description=(
        "The dashboard's base URL; each payload links to {dashboard_url}/studies/{uid}."))
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    timeout_s: float = Field(default=5.0, gt=0, le=120, description=(
        "Per request (connect and answer): a slow endpoint costs an attempt, not the "
        "node's time."))
    senders: int = Field(default=4, ge=1, le=64, description=(
        "Requests in flight at once, so one slow endpoint does not hold up the others."))
    poll_interval_s: float = Field(default=0.5, gt=0)


#: Bind addresses on which the dashboard may be viewed without signing in.
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1", "localhost"})


class WebSettings(BaseModel):
    """The dashboard, REST API and ``/metrics`` (``web`` in the config; null: off).

    Bound to loopback the pages can be viewed without signing in; any other address
    needs ``users`` or ``trusted_user_header``, and actions always need a signed-in
    user (see ``dicomnode/web/auth.py``).
    """

    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port (0: any free).")
    bind_address: str = Field(default="127.0.0.1", description=(
        "Listening address; anything but loopback requires authentication."))
    users: dict[str, str] = Field(default_factory=dict, description=(
        "User name -> password hash made by `dicomnode web-passwd` (HTTP Basic)."))
    trusted_user_header: str | None = Field(default=None, description=(
        "Header carrying the signed-in user set by an authenticating (OIDC) reverse "
        "proxy, e.g. X-Forwarded-User; honoured only from trusted_proxies."))
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"],
                                       description="Addresses the user header is taken from.")

    @property
    def loopback(self) -> bool:
        """Whether the dashboard listens on loopback only."""
        return self.bind_address in LOOPBACK_ADDRESSES

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> WebSettings:
        if not self.loopback and not self.users and not self.trusted_user_header:
            raise ValueError(
                f"Invalid 'web.bind_address' value '{self.bind_address}' - off loopback the "
                "dashboard requires authentication: set web.users (dicomnode web-passwd) "
                "or web.trusted_user_header")
        for name, value in self.users.items():
            if not value.startswith(("scrypt$", "pbkdf2_sha256$")):
                raise ValueError(
                    f"Invalid 'web.users.{name}' value - not a password hash; make one with "
                    "`dicomnode web-passwd`")
        return self

class RadiomicsSettings(BaseModel):
    """IBSI radiomics of the segmented structures, in the SR and the JSON result
    (``radiomics`` in the config; off by default: it costs seconds per study)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Compute the features at all.")
    pipelines: list[str] | None = Field(default=None, description=(
        "Pipelines whose structures get features; null: every pipeline with a label map."))
    families: list[str] = Field(default_factory=lambda: [
        "morphology", "statistics", "intensity_histogram", "glcm", "glrlm", "glszm",
        "ngtdm"], description="Feature families reported.")
    bin_width_hu: float = Field(default=25.0, gt=0, description=(
        "Fixed bin width (HU) of the intensity histogram and texture matrices."))
    bin_lower_bound_hu: float = Field(default=-1000.0, description=(
        "Lower bound (HU) of the first bin and of the intensity range."))
    resample_mm: float | None = Field(default=1.0, gt=0, description=(
        "Isotropic voxel size (mm) the CT and masks are resampled to; null: none."))
    aggregation: str = Field(default="3d_volume_merge", description=(
        "Texture aggregation: 3d_volume_merge, 3d_average, 2.5d_volume_merge or "
        "2.5d_direction_merge."))
    organs: bool = Field(default=False, description=(
        "Features of organs too (the liver, organs at risk); off by default: lesions and "
        "haemorrhages only (a liver at 1 mm costs ~25 s of CPU, a lesion ~1 s)."))

    @model_validator(mode="after")
    def _check(self) -> RadiomicsSettings:
        self.parameters()  # the extraction's own checks, naming the offending key
        return self

    def parameters(self) -> Any:
        """The extraction's :class:`dicomnode.results.radiomics.RadiomicsParameters`."""
        from dicomnode.results.radiomics import RadiomicsParameters

        return RadiomicsParameters(
            families=tuple(self.families), bin_width_hu=self.bin_width_hu,
            bin_lower_bound_hu=self.bin_lower_bound_hu, resample_mm=self.resample_mm,
            aggregation=self.aggregation, organs=self.organs)

    def for_pipeline(self, name: str) -> Any:
        """The parameters when ``name``'s structures get features, else ``None``."""
        if not self.enabled or (self.pipelines is not None and name not in self.pipelines):
            return None
        return self.parameters()
class ResultsSettings(BaseModel):
    """Which further result objects the pipelines send (see ``workflow/emit.py``)."""

    burned_in_series: bool = Field(default=False, description=(
        "Also send a Secondary Capture series with the contours and names burned into "
        "every slice with a structure, for PACS viewers that show neither SEG nor "
        "RTSTRUCT (marked derived and 'not for diagnosis')."))


class Settings(BaseSettings):
    """All settings of one node.

    Every field can be set in the YAML file or as ``DICOMNODE_<FIELD>`` in the
    environment (nested fields as ``DICOMNODE_COMPLETION__QUIET_PERIOD_S``).
    """

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_", env_nested_delimiter="__", extra="forbid"
    )

    ae_title: str = "DICOMNODE"
    port: int | None = Field(default=11112, ge=0, le=65535, description=(
        "Listening port for plain DICOM; null: none (TLS only, see `tls`)."))
    tls: ListenerTls | None = Field(default=None, description=(
        "DICOM TLS on a second port; None: no TLS listener."))
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("./var")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite under data_dir."
    )
    max_associations: int = Field(default=16, ge=1, description=(
        "Associations open at once; a further request is rejected (local limit exceeded). "
        "A connection counts from its association request on."))
    max_associations_per_ip: int = Field(default=8, ge=1, description=(
        "Associations open at once from one IP address (further requests rejected); also "
        "the connections from one address that have not yet sent their association "
        "request (further ones are closed at once)."))
    max_pdu: int = Field(default=2**20, description=(
        "Maximum PDU length announced to peers and enforced: a P-DATA-TF PDU longer than "
        "this aborts the association before any of it is read."))
    association_timeout_s: float = Field(default=5.0, gt=0, le=600, description=(
        "A connection must send its whole A-ASSOCIATE-RQ within this time (ARTIM); also "
        "how long a rejected, released or aborted association waits for the peer to close."))
    pdu_timeout_s: float = Field(default=10.0, gt=0, le=3600, description=(
        "Once a PDU's first byte is in, the whole PDU must arrive within this time."))
    network_timeout_s: float = Field(default=60.0, gt=0, description=(
        "An association with no PDU for this long is aborted."))
    chunked_receive: bool = Field(
        default=True,
        description="Receive datasets straight into spool files as they arrive (faster; "
        "one node per process).",
    )
    dul_poll_s: float = Field(
        default=0.0002, gt=0, le=0.01,
        description="pynetdicom's DUL idle poll while an association is open (its default "
        "is 1 ms, which caps ingest speed).",
    )
    direct_encoding: bool = Field(
        default=True,
        description="Write plain C-STORE responses and received files' File Meta "
        "Information directly (byte-identical to pynetdicom/pydicom, ~0.6 ms less per "
        "instance); false: pynetdicom and pydicom encode them.",
    )
    allowed_calling_aets: list[str] | None = Field(
        default=None,
        description="Calling AE allow-list; None accepts any AE (embedded default).",
    )
    require_called_aet: bool = Field(
        default=True,
        description="Reject an association whose called AE title is not ae_title.",
    )
    disk_reserve_mb: int = Field(
        default=1024, ge=0, description="Refuse stores (0xA700) below this much free space."
    )
    peers: dict[str, Peer] = Field(default_factory=dict)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    routing_rules: Path | None = Field(
        default=None, description="Routing YAML; None uses the embedded config/routing.yaml."
    )
    workers: int = Field(default=1, ge=0, description=(
        "Embedded job worker threads, taking any job, highest priority first; 0: no "
        "embedded execution at all (the urgent lane does not start either)."))
    urgent_workers: int = Field(default=1, ge=0, description=(
        "Further worker threads kept for urgent work: they take only routing jobs (quick, "
        "and a study is not known to be urgent before it is routed) and urgent pipeline "
        "jobs, so an urgent study starts at once even while every other worker runs a "
        "long job. They share the device with the other workers. 0: no lane."))
    job_nice: int = Field(default=10, ge=0, le=19, description=(
        "How much nicer (Linux nice levels) the job workers run than the listener, so "
        "that receiving keeps priority over the models on a busy CPU; the networks' "
        "threads inherit it. 0: the same priority."))
    warm_up: bool = Field(default=True, description=(
        "At start, off the receiving path, load and run each available pipeline once and "
        "encode a small SEG/RTSTRUCT/SR, so the first study pays no start-up."))
    no_result_report: bool = Field(default=False, description=(
        "When a pipeline ran but may report nothing (no liver found, a volume too small "
        "or too large), send a text SR saying so and why, to the result destinations, so "
        "that a reader sees the series was analysed."))
    seg_writer_process: bool = Field(default=True, description=(
        "Write each result's DICOM-SEG in a helper process while the job writes its "
        "RTSTRUCT and SR (one more Python process of ~150 MB; the SEG is the longest of "
        "the three to encode)."))
    device: str = Field(default="auto", description=(
        "Where the pipelines' networks run: 'auto' (the first CUDA GPU when present, else "
        "the CPU), 'cpu' or 'cuda:N'."))
    models_dir: Path | None = Field(default=None, description=(
        "Models folder (manifest.json, weight files); None: the shipped models/."))
    executor: str = Field(default="threads", pattern="^(threads|celery)$", description=(
        "Where jobs run: 'threads' in this process (the embedded default), or 'celery' "
        "on `dicomnode worker` processes fed through `broker_url`."))
    broker_url: str | None = Field(default=None, description=(
        "With executor celery: the RabbitMQ broker, amqp://USER:PASS@HOST:5672/VHOST."))
    celery: CelerySettings = Field(default_factory=CelerySettings)
    web: WebSettings | None = Field(default_factory=WebSettings, description=(
        "Dashboard, REST API and /metrics over HTTP; null: off."))
    radiomics: RadiomicsSettings = Field(default_factory=RadiomicsSettings, description=(
        "IBSI radiomics of the segmented structures (off by default)."))
    log_format: str = Field(default="text", pattern="^(text|json)$")
    log_level: str = "INFO"

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v, "ae_title")

    @field_validator("web", mode="before")
    @classmethod
    def _web_off(cls, v: Any) -> Any:
        # DICOMNODE_WEB=off in the environment turns the dashboard off (an empty or
        # "null" value is dropped by pydantic-settings before validation)
        return None if isinstance(v, str) and v.strip().lower() in ("null", "none", "off") \
            else v

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        return [_check_ae_title(a, "allowed_calling_aets") for a in v]

    @field_validator("max_pdu")
    @classmethod
    def _max_pdu(cls, v: int) -> int:
        if not MIN_PDU <= v <= MAX_PDU:
            raise ValueError(
                f"Invalid 'max_pdu' value '{v}' - a PDU length from {MIN_PDU} to {MAX_PDU} "
                "bytes (the node reads each PDU whole, so it must be bounded; 0, unlimited, "
                "is not accepted)")
        return v

    @model_validator(mode="after")
    def _default_db(self) -> Settings:
        if self.port is None and self.tls is None:
            raise ValueError("Invalid 'port' value 'None' - with no plain port the node "
                             "needs a TLS listener (tls); it would listen nowhere")
        if self.tls is not None and self.port is not None and self.port != 0 \
                and self.tls.port == self.port:
            raise ValueError(f"Invalid 'tls.port' value '{self.tls.port}' - the plain "
                             "listener has that port already")
        if self.executor == "celery" and not self.broker_url:
            raise ValueError("Invalid 'broker_url' value 'None' - executor celery needs a "
                             "broker (amqp://USER:PASS@HOST:5672/VHOST)")
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'dicomnode.db'}"
        for key in self.peers:
            _check_ae_title(key, "peers")
        return self

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL in use (never None after validation)."""
        assert self.database_url is not None
        return self.database_url

    @property
    def spool_dir(self) -> Path:
        """Where received instances are kept."""
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """Where result objects are written before export."""
        return self.data_dir / "results"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``DICOMNODE_CONFIG`` (set by ``load_settings``)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("DICOMNODE_CONFIG")
        if not path:
            return {}
        return read_yaml(Path(path))


def read_yaml(path: Path, name: str = "config") -> dict[str, Any]:
    """Read a YAML file and check that it is a mapping.

    Parameters
    ----------
    path : Path
        The YAML file.
    name : str
        The setting that named the file, for error messages.

    Returns
    -------
    dict
        The parsed mapping (empty for an empty file).
    """
    if not path.is_file():
        raise ValueError(f"Invalid '{name}' value '{path}' - no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"Invalid '{name}' value '{path}' - not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Invalid '{name}' value '{path}' - the top level must be a mapping")
    return data


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from a YAML file, the environment and keyword overrides.

    Parameters
    ----------
    config : Path, optional
        YAML file; falls back to ``DICOMNODE_CONFIG``; without either the embedded
        defaults apply.
    **overrides
        Field values that win over everything else.

    Returns
    -------
    Settings
    """
    previous = os.environ.get("DICOMNODE_CONFIG")
    if config is not None:
        os.environ["DICOMNODE_CONFIG"] = str(config)
    try:
        return Settings(**overrides)
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop("DICOMNODE_CONFIG", None)
            else:
                os.environ["DICOMNODE_CONFIG"] = previous
