"""Settings: the only reader of the environment (prefix ``MEDCAD_``).

Defaults serve one machine with no Redis and no PostgreSQL: SQLite and a filesystem broker under
``data_dir``. Production sets ``MEDCAD_DATABASE_URL`` and ``MEDCAD_BROKER_URL``.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    """All configuration of the API and the workers."""

    model_config = SettingsConfigDict(env_prefix="MEDCAD_", extra="ignore")

    data_dir: Path = Path("./medcad-data")
    database_url: str | None = None  # default: sqlite under data_dir
    broker_url: str | None = None  # default: kombu filesystem transport under data_dir
    models_dir: Path = _REPO_MODELS
    admin_api_key: SecretStr | None = None  # seeds an admin key when set

    # ingest budgets (checked from headers, before any pixel decode)
    max_upload_bytes: int = 2 * 1024**3
    max_decoded_bytes: int = 512 * 1024**2
    max_zip_members: int = 10_000
    max_zip_ratio: float = 200.0
    max_queue_depth: int = 10_000

    # workers
    worker_concurrency: int = 1
    ort_intra_op_threads: int = 0  # 0 = number of cores / worker processes
    ort_inter_op_threads: int = 1
    job_lease_seconds: int = 900
    job_max_attempts: int = 3
    task_time_limit: int = 1200
    sweeper_interval_seconds: float = 15.0
    queued_resend_after_seconds: float = 60.0
    # /readyz reports the workers stalled when a job has waited this long with none consuming
    worker_stall_seconds: float = 180.0
    saliency_max_forward_passes: int = 128  # default perturbation budget per job and model
    saliency_request_max_passes: int = 4096  # the most a request may ask for
    worker_sweeper: bool = True  # run the sweeper in each worker's main process

    # API
    api_processes: int = Field(default=1, ge=1)  # `medcad serve` processes sharing the port
    # database connections each process keeps open (10 more at a peak, closed after it); an
    # API process runs at most this many requests' units of work at once, the others wait
    db_pool_size: int = Field(default=20, ge=1, le=500)
    # Not a user setting: `medcad serve --api-processes N` tells its API processes its pid
    api_supervisor_pid: int | None = None
    cors_origins: list[str] = Field(default_factory=list)
    log_level: str = "INFO"
    log_json: bool = True
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = 5
    deidentify_on_ingest: bool = False
    # HMAC key of the UID remapping of de-identification; default: a random key kept in
    # data_dir/deid-uid.key (the same original UID always maps to the same new UID)
    deidentify_uid_key: SecretStr | None = None
    rate_limit_per_minute: int = 6000  # per API key (or per address without one); 0: off
    rate_limit_burst: int = 1000
    max_request_body_bytes: int = 1024 * 1024  # every route except the upload routes
    http_header_timeout_seconds: float = 15.0  # a request's headers must arrive within this
    http_body_idle_timeout_seconds: float = 60.0  # longest wait for the next body chunk

    # DICOM listener (``medcad dicom-listener``: C-STORE SCP + C-ECHO)
    listener_host: str = "127.0.0.1"  # 0.0.0.0 to accept modalities from the network
    listener_port: int = 11112
    listener_ae_title: str = "MEDCAD"
    listener_allowed_callers: str = ""  # comma list of calling AE titles; empty = any caller
    listener_models: str = ""  # comma list of model names; empty = the default models

    # Forwarding of result objects (SEG, SR, Parametric Map) after a job succeeds
    forward_stow_url: str | None = None  # DICOMweb root, e.g. https://pacs/dicom-web
    forward_authorization: SecretStr | None = None  # Authorization header value for STOW-RS
    forward_dimse: str | None = None  # "AETITLE@host:port" of a C-STORE SCP
    forward_timeout_seconds: float = 30.0

    @property
    def allowed_callers(self) -> list[str]:
        """Calling AE titles the listener accepts (empty: every caller)."""
        return [t.strip() for t in self.listener_allowed_callers.split(",") if t.strip()]

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to SQLite in ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'medcad.sqlite3').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """The Celery broker URL, defaulting to the filesystem transport."""
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        """Folder used by the filesystem broker (embedded shape)."""
        return (self.data_dir / "broker").resolve()

    @cached_property
    def blob_dir(self) -> Path:
        """Root of the content-addressed blob store (resolved once: every download needs it)."""
        return (self.data_dir / "blobs").resolve()

    @property
    def is_embedded(self) -> bool:
        """True when running on the filesystem broker (one machine, no Redis)."""
        return self.resolved_broker_url.startswith("filesystem")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
