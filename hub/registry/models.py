"""The registry's data model: who owns what, base models, adapters, their
immutable revisions (a lineage DAG), content-addressed blobs and jobs."""

import hashlib
import re
import secrets
import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models.functions import Lower

from adapters_ops import opspecs

from .querysets import AdapterQuerySet, JobQuerySet

# Repo-style names: letters, digits, '-', '_', '.'; starting with a letter or digit.
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
name_validator = RegexValidator(NAME_RE, "Use letters, digits, '-', '_' or '.', starting with a letter or digit.")
# Device names Windows cannot create as a folder: `hubctl pull` and HF snapshots name folders after repos.
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def repo_name_problem(name: str) -> str | None:
    """Why `name` cannot name a new repository under the Hugging Face Hub's rules, or None.

    NAME_RE, and: no trailing '.' or '-', no '..' or '--', not a reserved device name.
    Uniqueness is case-insensitive (Adapter's constraint), as on the Hub."""
    if not re.match(NAME_RE, name or ""):
        return "use letters, digits, '-', '_' or '.', starting with a letter or digit (at most 96 characters)"
    if name[-1] in ".-":
        return "a name cannot end with '.' or '-'"
    if ".." in name or "--" in name:
        return "a name cannot contain '..' or '--'"
    if name.split(".", 1)[0].lower() in RESERVED_NAMES:
        return f"'{name.split('.', 1)[0]}' is a reserved device name on Windows"
    return None


class Org(models.Model):
    """An owner namespace shared by several users (like an HF organization)."""

    name = models.CharField(max_length=96, unique=True, validators=[name_validator])
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="orgs")

    def __str__(self):
        return self.name


class Membership(models.Model):
    ROLES = [("admin", "admin"), ("write", "write")]
    org = models.ForeignKey(Org, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=8, choices=ROLES, default="write")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["org", "user"], name="unique_membership")]


class ApiToken(models.Model):
    """A bearer token for hubctl and huggingface_hub. Only its sha256 is kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=64, default="default")
    prefix = models.CharField(max_length=12)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)  # None: until revoked

    PREFIX = "hub_"

    @classmethod
    def issue(cls, user, name="default", expires_at=None) -> tuple["ApiToken", str]:
        raw = cls.PREFIX + secrets.token_urlsafe(30)
        token = cls.objects.create(user=user, name=name, prefix=raw[:12], key_hash=cls.hash(raw),
                                   expires_at=expires_at)
        return token, raw

    def expired(self, now=None) -> bool:
        from django.utils import timezone

        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @staticmethod
    def hash(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()

    def __str__(self):
        return f"{self.prefix}… ({self.user})"


class Blob(models.Model):
    """A file's bytes, stored once under its sha256."""

    sha256 = models.CharField(max_length=64, primary_key=True)
    size = models.BigIntegerField()
    key = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.sha256[:12]} ({self.size} B)"


def _now():
    from django.utils import timezone

    return timezone.now()


class StagedUpload(models.Model):
    """A blob one user uploaded on its own (`PUT /api/v1/uploads/{sha256}`) for a
    commit still to come. It lets that user, and only that user, name the blob
    by its sha256 in a commit; `gc_blobs` drops it once `touched_at` is older
    than its grace, and with it the blob if nothing else refers to it."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staged_uploads")
    blob = models.ForeignKey(Blob, on_delete=models.CASCADE, related_name="staged")
    # Set by the upload, and again by each HEAD and commit that finds it: a resumed push keeps it alive.
    touched_at = models.DateTimeField(default=_now, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "blob"], name="unique_staged_upload")]

    def __str__(self):
        return f"{self.blob_id[:12]} staged by {self.user_id}"


class BaseModel(models.Model):
    STATUS = [("active", "active"), ("deprecated", "deprecated"), ("retired", "retired")]

    slug = models.CharField(max_length=96, unique=True, validators=[name_validator])
    family = models.CharField(max_length=64, blank=True, default="")
    version = models.CharField(max_length=32, blank=True, default="")
    weights_uri = models.CharField(max_length=500, blank=True, default="")
    # tensor name -> {"shape": [...], "dtype": "F32"}, read from safetensors headers
    manifest = models.JSONField(default=dict)
    # the HF config.json (architectures, hidden sizes): what serving systems check
    config = models.JSONField(default=dict, blank=True)
    # 40-hex id of the registered file set, served as the HF commit
    sha = models.CharField(max_length=40, blank=True, default="")
    status = models.CharField(max_length=12, choices=STATUS, default="active")
    successor = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="predecessors")
    deprecate_at = models.DateTimeField(null=True, blank=True)
    description = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self):
        return self.slug


class BaseModelFile(models.Model):
    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=300)
    blob = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="base_files")

    class Meta:
        ordering = ["path"]
        constraints = [models.UniqueConstraint(fields=["base_model", "path"], name="unique_base_file")]


class Tag(models.Model):
    name = models.CharField(max_length=64, unique=True)

    def __str__(self):
        return self.name


class Adapter(models.Model):
    VISIBILITY = [("public", "public"), ("private", "private")]

    owner = models.CharField(max_length=96, validators=[name_validator], db_index=True)
    name = models.CharField(max_length=96, validators=[name_validator])
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="adapters")
    visibility = models.CharField(max_length=8, choices=VISIBILITY, default="public")
    tags = models.ManyToManyField(Tag, blank=True, related_name="adapters")
    description = models.TextField(blank=True, default="")  # the model card (markdown)
    seeds = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    downloads = models.BigIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Metadata of the `main` revision, denormalised so lists can filter on what
    # LoRAX and vLLM check before serving (rank, modules, dtype, size).
    r = models.IntegerField(null=True, blank=True)
    lora_alpha = models.FloatField(null=True, blank=True)
    target_modules = models.JSONField(default=list, blank=True)
    dtype = models.CharField(max_length=8, blank=True, default="")
    size = models.BigIntegerField(default=0)

    objects = AdapterQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_adapter_name"),
            # As on the Hugging Face Hub, names that differ only by case are the same repository.
            models.UniqueConstraint(Lower("owner"), Lower("name"), name="unique_adapter_name_ci"),
        ]

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self):
        return self.repo_id


class Revision(models.Model):
    """An immutable snapshot of an adapter's files; parents form the lineage DAG."""

    # upload, then every kind an op declares it makes (adapters_ops/opspecs.py). Not DB
    # choices: a new op's kind needs no migration; the runner stores only declared kinds.
    KINDS = opspecs.revision_kinds()

    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="revisions")
    sha = models.CharField(max_length=40, db_index=True)  # HF-style commit id
    kind = models.CharField(max_length=12, default="upload")
    message = models.CharField(max_length=300, blank=True, default="")
    params = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    # Derived revisions: the quality verdict (adapters_ops.verdict: status passed | degraded |
    # failed | unverified, accuracies before/after, ratio, the examples used); null on uploads.
    verdict = models.JSONField(null=True, blank=True, default=None)
    parents = models.ManyToManyField("self", symmetrical=False, blank=True, related_name="children")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="+")
    job = models.ForeignKey("Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="revisions")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # What the PEFT config and safetensors header say (see Adapter's copy).
    r = models.IntegerField(null=True, blank=True)
    lora_alpha = models.FloatField(null=True, blank=True)
    target_modules = models.JSONField(default=list, blank=True)
    dtype = models.CharField(max_length=8, blank=True, default="")
    size = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["adapter", "sha"], name="unique_revision_sha")]

    def __str__(self):
        return f"{self.adapter}@{self.sha[:8]} ({self.kind})"


class RevisionFile(models.Model):
    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=300)
    blob = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="revision_files")

    class Meta:
        ordering = ["path"]
        constraints = [models.UniqueConstraint(fields=["revision", "path"], name="unique_revision_file")]


class Ref(models.Model):
    """A named pointer to a revision: `main`, and one per derived kind."""

    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="refs")
    name = models.CharField(max_length=64)
    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="refs")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["adapter", "name"], name="unique_ref")]


class Job(models.Model):
    """A unit of background work. This row is the truth; the Celery message
    only carries its id."""

    STATUS = [(s, s) for s in ("queued", "running", "succeeded", "failed", "cancelled")]
    FINISHED = ("succeeded", "failed", "cancelled")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    op = models.CharField(max_length=32, db_index=True)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=STATUS, default="queued", db_index=True)
    progress = models.FloatField(default=0.0)
    message = models.CharField(max_length=300, blank=True, default="")
    attempts = models.IntegerField(default=0)
    max_attempts = models.IntegerField(default=3)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, default="")
    error = models.TextField(blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    adapter = models.ForeignKey(Adapter, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    result_revision = models.ForeignKey(Revision, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # stage outputs of resumable ops: stage name -> blob sha256
    checkpoints = models.JSONField(default=dict, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.op} {self.id} ({self.status})"


class Webhook(models.Model):
    """An owner's subscription to events about its adapters (moved to a new
    base, move failed, job finished). Deliveries are signed with `secret` in
    the Standard Webhooks scheme (docs/webhooks.md); the secret is kept in
    clear because signing needs it, and shown to the owner only at creation."""

    EVENTS = ["adapter.moved", "adapter.move_failed", "job.finished"]

    owner = models.CharField(max_length=96, validators=[name_validator], db_index=True)
    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=80)
    events = models.JSONField(default=list)
    active = models.BooleanField(default=True)
    description = models.CharField(max_length=200, blank=True, default="")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["owner", "id"]

    def __str__(self):
        return f"{self.owner} -> {self.url}"


class WebhookDelivery(models.Model):
    """One event sent (or being sent) to one webhook. Its id is the
    `webhook-id` header: the same on every retry, so receivers can de-duplicate."""

    STATUS = [(s, s) for s in ("pending", "delivered", "failed")]

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=32)
    # what makes an event unique for a webhook ("job.finished:<job id>"): a
    # job finishing is announced once, however often the hook runs
    dedupe_key = models.CharField(max_length=120)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=12, choices=STATUS, default="pending", db_index=True)
    attempts = models.IntegerField(default=0)
    # when a worker may next try it; a worker trying it pushes this forward
    # first (a lease), so a duplicate message finds it taken
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    response_status = models.IntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["webhook", "dedupe_key"], name="unique_delivery")]

    def __str__(self):
        return f"{self.event} -> {self.webhook_id} ({self.status})"
