"""Settings for the adapter hub, read from the environment (12-factor).

With no environment at all the hub runs on embedded defaults under HUB_HOME
(default ./var): a SQLite database, filesystem blobs and a Redis started by
`hubctl serve`. Production sets DATABASE_URL, REDIS_URL, S3_BUCKET and SECRET_KEY.
"""

import os
from pathlib import Path

import environ
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

HUB_HOME = Path(env.str("HUB_HOME", default=str(BASE_DIR / "var"))).resolve()
HUB_HOME.mkdir(parents=True, exist_ok=True)  # the SQLite file and blobs live here

DEBUG = env.bool("DEBUG", default=False)


def _install_secret_key() -> str:
    """The key `hubctl serve` makes once per install, readable by its owner only."""
    try:
        return (HUB_HOME / "secret-key").read_text().strip()
    except OSError:
        return ""


# SECRET_KEY, else serve's per-install key, else a built-in key that is public (it is
# in this file): good enough for tests and a laptop, so it is refused when DEBUG=0
# declares a deployment, and `check --deploy` reports it (hub.E001).
_EMBEDDED_SECRET_KEY = "insecure-embedded-default-key-change-me-in-production-0123456789"
SECRET_KEY = env.str("SECRET_KEY", default="") or _install_secret_key()
if not SECRET_KEY:
    if "DEBUG" in os.environ and not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set and DEBUG is off: set SECRET_KEY in the environment to a long random "
            "secret, e.g. export SECRET_KEY=\"$(python -c 'import secrets; print(secrets.token_urlsafe(50))')\" "
            "(the same on every web and worker process), or run `hubctl serve`, which makes one in "
            f"{HUB_HOME / 'secret-key'}; DEBUG=1 allows the built-in key on a development machine."
        )
    SECRET_KEY = _EMBEDDED_SECRET_KEY


# Registered beside the key it guards: every process that could run on it imports this module.
@checks.register(checks.Tags.security, deploy=True)
def _check_embedded_secret_key(app_configs, **kwargs):
    from django.conf import settings

    if settings.SECRET_KEY != _EMBEDDED_SECRET_KEY:
        return []
    return [checks.Error(
        "SECRET_KEY is the built-in default of hub/settings.py, which anyone can read: sessions, CSRF "
        "tokens and signed values of this site can be forged.",
        hint="Set SECRET_KEY in the environment to a long random secret (and DEBUG=0, which then refuses "
             "to start without one).",
        id="hub.E001",
    )]


ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "hub.registry",
    "hub.api",
    "hub.hfcompat",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "hub.urls"
WSGI_APPLICATION = "hub.wsgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{HUB_HOME / 'hub.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web threads and workers share the file: wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update(timeout=30, transaction_mode="IMMEDIATE")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = HUB_HOME / "static"

# --- blobs -----------------------------------------------------------------
# Filesystem under HUB_HOME/blobs by default; S3 (boto3) when S3_BUCKET is set.
S3_BUCKET = env.str("S3_BUCKET", default="")
AWS_ENDPOINT_URL = env.str("AWS_ENDPOINT_URL", default="") or None
AWS_REGION = env.str("AWS_REGION", default="us-east-1")
# "proxy" streams S3 objects through the hub (Range honoured); "redirect"
# answers file downloads with a short-lived presigned URL.
S3_DOWNLOAD_MODE = env.str("S3_DOWNLOAD_MODE", default="proxy")
S3_PRESIGN_SECONDS = env.int("S3_PRESIGN_SECONDS", default=300)
BLOB_ROOT = Path(env.str("BLOB_ROOT", default=str(HUB_HOME / "blobs")))
# Filesystem blobs behind a front server: "x-accel-redirect" (nginx, internal
# location BLOB_ACCEL_PREFIX aliased to BLOB_ROOT) or "x-sendfile" (Apache,
# lighttpd) lets it send the file; "" sends it from gunicorn (sendfile). docs/deploy.md
BLOB_ACCEL = env.str("BLOB_ACCEL", default="")
BLOB_ACCEL_PREFIX = env.str("BLOB_ACCEL_PREFIX", default="/_blobs/")
if BLOB_ACCEL not in ("", "x-accel-redirect", "x-sendfile"):
    raise ImproperlyConfigured(f"BLOB_ACCEL={BLOB_ACCEL!r}: use x-accel-redirect, x-sendfile or leave it empty.")
# Staged uploads behind nginx: "nginx" lets the front server store the body of
# `PUT /api/v1/uploads/{sha256}` itself (client_body_in_file_only) and name
# the file in X-Upload-File. Only then does the hub trust that header, and
# only for a regular file under UPLOAD_ACCEL_ROOT (nginx's client_body_temp_path,
# on the blob root's filesystem so the commit is a hard link). docs/deploy.md
UPLOAD_ACCEL = env.str("UPLOAD_ACCEL", default="")
# Resumable uploads (a PUT with Content-Range) keep the bytes received so far
# here until the rest arrives: by default inside BLOB_ROOT (HUB_HOME with S3).
# Every web host of one hub must see the same folder (docs/deploy.md).
PARTIAL_UPLOAD_DIR = env.str("PARTIAL_UPLOAD_DIR", default="")
UPLOAD_ACCEL_ROOT = env.str("UPLOAD_ACCEL_ROOT", default="")
if UPLOAD_ACCEL not in ("", "nginx"):
    raise ImproperlyConfigured(f"UPLOAD_ACCEL={UPLOAD_ACCEL!r}: use nginx or leave it empty.")
if UPLOAD_ACCEL and not os.path.isabs(UPLOAD_ACCEL_ROOT):
    raise ImproperlyConfigured(f"UPLOAD_ACCEL={UPLOAD_ACCEL} needs UPLOAD_ACCEL_ROOT, the absolute path of nginx's "
                               f"client_body_temp_path for the upload location (got {UPLOAD_ACCEL_ROOT!r}).")
if S3_BUCKET:
    STORAGES = {
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": S3_BUCKET,
                "endpoint_url": AWS_ENDPOINT_URL,
                "region_name": AWS_REGION,
                "file_overwrite": True,
                "default_acl": None,
                "querystring_expire": S3_PRESIGN_SECONDS,
                "object_parameters": {"ChecksumAlgorithm": "SHA256"},
            },
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
else:
    STORAGES = {
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(BLOB_ROOT)},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }

# --- uploads ---------------------------------------------------------------
# Every upload is spooled to a temporary file while it is hashed and counted.
FILE_UPLOAD_HANDLERS = ["hub.registry.uploads.HashingUploadHandler"]
FILE_UPLOAD_TEMP_DIR = env.str("FILE_UPLOAD_TEMP_DIR", default=None)
MAX_UPLOAD_BYTES = env.int("MAX_UPLOAD_BYTES", default=4 * 1024**3)
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=150 * 1024**2)
DATA_UPLOAD_MAX_NUMBER_FILES = 200

# --- broker and workers -------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6390/0")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
JOB_MAX_ATTEMPTS = env.int("JOB_MAX_ATTEMPTS", default=3)
JOB_HEARTBEAT_TIMEOUT = env.int("JOB_HEARTBEAT_TIMEOUT", default=60)

# --- owner webhooks (docs/webhooks.md) -------------------------------------------
# Off by default: a hub must not be made to POST into its own network.
WEBHOOK_ALLOW_PRIVATE = env.bool("WEBHOOK_ALLOW_PRIVATE", default=False)
WEBHOOK_TIMEOUT = env.float("WEBHOOK_TIMEOUT", default=10.0)
# Seconds to wait before each retry of a failed delivery; one attempt more than entries.
WEBHOOK_RETRY_DELAYS = env.list("WEBHOOK_RETRY_DELAYS", cast=float, default=[10, 60, 300, 1800, 7200, 21600])

# --- REST API ------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "hub.api.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticatedOrReadOnly"],
    "DEFAULT_PAGINATION_CLASS": "hub.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "hub.api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env.str("THROTTLE_ANON", default="600/min"),
        "user": env.str("THROTTLE_USER", default="6000/min"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Adapter hub API",
    "DESCRIPTION": "Registry of LoRA adapters with base-model lineage, and jobs that compress, merge, transfer and quantize them.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # One params component per op, from the op declarations (adapters_ops/opspecs.py).
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "hub.api.ops.params_schemas"],
    "ENUM_NAME_OVERRIDES": {
        "BaseModelStatusEnum": "hub.registry.models.BaseModel.STATUS",
        "JobStatusEnum": "hub.registry.models.Job.STATUS",
        "VisibilityEnum": "hub.registry.models.Adapter.VISIBILITY",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="WARNING")},
}
