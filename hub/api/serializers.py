from rest_framework import serializers

from hub.registry.models import Adapter, BaseModel, Job, Revision, RevisionFile, Webhook, WebhookDelivery
from hub.registry.selectors import refs_of
from hub.registry.services import MAX_FILES


class BaseModelSerializer(serializers.ModelSerializer):
    successor = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    files = serializers.SerializerMethodField()
    architectures = serializers.SerializerMethodField()
    adapters = serializers.IntegerField(source="adapters.count", read_only=True)

    class Meta:
        model = BaseModel
        fields = [
            "slug", "family", "version", "weights_uri", "status", "successor", "deprecate_at", "description",
            "sha", "architectures", "files", "adapters", "created_at",
        ]
        read_only_fields = ["weights_uri", "status", "successor", "deprecate_at", "sha", "created_at"]

    def get_files(self, obj) -> list[dict]:
        return [{"path": f.path, "size": f.blob.size, "sha256": f.blob.sha256} for f in obj.files.select_related("blob")]

    def get_architectures(self, obj) -> list[str]:
        return list(obj.config.get("architectures") or [])


class BaseModelDetailSerializer(BaseModelSerializer):
    class Meta(BaseModelSerializer.Meta):
        fields = BaseModelSerializer.Meta.fields + ["manifest", "config"]


class BaseModelCreateSerializer(serializers.Serializer):
    slug = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    family = serializers.CharField(required=False, allow_blank=True, default="")
    version = serializers.CharField(required=False, allow_blank=True, default="")
    description = serializers.CharField(required=False, allow_blank=True, default="")
    files = serializers.ListField(child=serializers.FileField(), min_length=1)


class BaseModelPatchSerializer(serializers.ModelSerializer):
    class Meta:
        model = BaseModel
        fields = ["family", "version", "description"]


class DeprecateSerializer(serializers.Serializer):
    successor = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    at = serializers.DateTimeField(required=False, allow_null=True)


class RevisionFileSerializer(serializers.ModelSerializer):
    size = serializers.IntegerField(source="blob.size")
    sha256 = serializers.CharField(source="blob.sha256")

    class Meta:
        model = RevisionFile
        fields = ["path", "size", "sha256"]


class VerdictSerializer(serializers.Serializer):
    """A derived revision's quality verdict (adapters_ops.verdict; docs/jobs.md): the source
    adapter and the result scored on the same seed examples, none of which chose the result."""

    status = serializers.ChoiceField(choices=["passed", "degraded", "failed", "unverified"], read_only=True)
    before = serializers.FloatField(read_only=True, help_text="exact-match accuracy of the source adapter")
    after = serializers.FloatField(read_only=True, help_text="exact-match accuracy of this revision")
    ratio = serializers.FloatField(read_only=True, allow_null=True, help_text="after / before")
    base = serializers.FloatField(read_only=True, help_text="accuracy of the bare base the result runs on")
    reason = serializers.CharField(read_only=True)
    examples = serializers.DictField(read_only=True, help_text=(
        "which examples were scored: source (held_out_seeds: seeds the op did not choose or train on; all_seeds: "
        "the op chose nothing on them; synthetic_labelled_by_source: too few seeds to hold out, synthetic inputs "
        "answered by the source adapter instead; none), n, of (seeds in all), indices (lines of the seed file)"))
    tolerances = serializers.DictField(read_only=True, help_text="pass_ratio and degraded_ratio of the policy")
    skills = serializers.DictField(read_only=True, child=serializers.DictField(),
                                   help_text="a merge: one verdict per input skill; the status is the worst")


class RevisionSerializer(serializers.ModelSerializer):
    base_model = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    parents = serializers.SerializerMethodField()
    refs = serializers.SerializerMethodField()
    files = RevisionFileSerializer(many=True, read_only=True)
    job = serializers.UUIDField(source="job_id", read_only=True, allow_null=True)
    verdict = VerdictSerializer(read_only=True, allow_null=True, help_text=(
        "quality verdict of a derived revision (null on uploads)"))

    class Meta:
        model = Revision
        fields = [
            "sha", "kind", "message", "base_model", "params", "metrics", "verdict", "parents", "refs", "files", "job",
            "r", "lora_alpha", "target_modules", "dtype", "size", "created_at",
        ]

    def get_parents(self, obj) -> list[dict]:
        return [{"adapter": p.adapter.repo_id, "sha": p.sha, "kind": p.kind} for p in obj.parents.select_related("adapter")]

    def get_refs(self, obj) -> list[str]:
        return refs_of(obj)


class AdapterSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="repo_id", read_only=True)
    base_model = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    tags = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)
    refs = serializers.SerializerMethodField()
    has_seeds = serializers.SerializerMethodField()

    class Meta:
        model = Adapter
        fields = [
            "id", "owner", "name", "base_model", "visibility", "tags", "r", "lora_alpha", "target_modules",
            "dtype", "size", "downloads", "refs", "has_seeds", "created_at", "updated_at",
        ]

    def get_refs(self, obj) -> dict[str, str]:
        return {ref.name: ref.revision.sha for ref in obj.refs.select_related("revision")}

    def get_has_seeds(self, obj) -> bool:
        return obj.seeds_id is not None


class AdapterDetailSerializer(AdapterSerializer):
    class Meta(AdapterSerializer.Meta):
        fields = AdapterSerializer.Meta.fields + ["description"]


class AdapterCreateSerializer(serializers.Serializer):
    name = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
        help_text="owner/name",
        error_messages={"invalid": "Name the adapter owner/name (letters, digits, '-', '_', '.')."},
    )
    base_model = serializers.CharField()
    visibility = serializers.ChoiceField(choices=["public", "private"], default="public")
    tags = serializers.CharField(required=False, allow_blank=True, default="", help_text="comma-separated")
    description = serializers.CharField(required=False, allow_blank=True, default="")
    files = serializers.ListField(child=serializers.FileField(allow_empty_file=True), min_length=1)
    seeds = serializers.FileField(required=False, allow_empty_file=False)


SHA256_RE = r"^[0-9a-f]{64}$"


class StagedFileSerializer(serializers.Serializer):
    path = serializers.CharField(max_length=300)
    sha256 = serializers.RegexField(SHA256_RE, help_text="of a blob staged with PUT /api/v1/uploads/{sha256}")


def staged_file_list():
    return StagedFileSerializer(many=True, min_length=1, max_length=MAX_FILES)


class AdapterCommitSerializer(AdapterCreateSerializer):
    """A new adapter whose files were staged first: named by path and sha256 (JSON)."""

    files = staged_file_list()
    seeds = serializers.RegexField(SHA256_RE, required=False, help_text="sha256 of the staged seed JSONL")


class BaseModelCommitSerializer(BaseModelCreateSerializer):
    """A base model whose files were staged first: named by path and sha256 (JSON)."""

    files = staged_file_list()


class AdapterPatchSerializer(serializers.Serializer):
    visibility = serializers.ChoiceField(choices=["public", "private"], required=False)
    description = serializers.CharField(required=False, allow_blank=True)
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False)


class JobSerializer(serializers.ModelSerializer):
    adapter = serializers.CharField(source="adapter.repo_id", read_only=True, allow_null=True)
    result = serializers.SerializerMethodField()
    owner = serializers.CharField(source="owner.username", read_only=True)

    class Meta:
        model = Job
        fields = [
            "id", "op", "params", "status", "progress", "message", "attempts", "max_attempts", "error",
            "cancel_requested", "adapter", "result", "owner", "created_at", "started_at", "finished_at",
            "heartbeat_at",
        ]

    def get_result(self, obj) -> dict | None:
        """The revision the job made: adapter, sha, kind and its quality verdict (or null)."""
        rev = obj.result_revision
        if rev is None:
            return None
        return {"adapter": rev.adapter.repo_id, "sha": rev.sha, "kind": rev.kind, "verdict": rev.verdict}


class JobCreateSerializer(serializers.Serializer):
    op = serializers.CharField(max_length=32, help_text="an op name from GET /api/v1/ops")
    params = serializers.DictField(required=False, default=dict, help_text="the op's parameters (JSON object)")


class WebhookSerializer(serializers.ModelSerializer):
    class Meta:
        model = Webhook
        fields = ["id", "owner", "url", "events", "active", "description", "created_at"]


class WebhookCreatedSerializer(WebhookSerializer):
    """The reply to a create or a secret rotation: the only time the secret is shown."""

    class Meta(WebhookSerializer.Meta):
        fields = WebhookSerializer.Meta.fields + ["secret"]


class WebhookCreateSerializer(serializers.Serializer):
    url = serializers.CharField(max_length=500)
    owner = serializers.CharField(max_length=96, required=False,
                                  help_text="the user or organization whose adapters it watches (default: you)")
    events = serializers.ListField(child=serializers.CharField(max_length=32), required=False,
                                   help_text="adapter.moved, adapter.move_failed, job.finished (default: all)")
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)


class WebhookPatchSerializer(serializers.Serializer):
    url = serializers.CharField(max_length=500, required=False)
    events = serializers.ListField(child=serializers.CharField(max_length=32), required=False)
    active = serializers.BooleanField(required=False)
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)


class WebhookDeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = ["id", "event", "status", "attempts", "response_status", "error", "next_attempt_at", "created_at",
                  "finished_at", "payload"]
