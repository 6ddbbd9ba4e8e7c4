from django.contrib import admin

from .models import Adapter, ApiToken, BaseModel, Blob, Job, Membership, Org, Ref, Revision


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Org)
class OrgAdmin(admin.ModelAdmin):
    search_fields = ["name"]
    inlines = [MembershipInline]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "user", "name", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "key_hash"]


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ["slug", "family", "version", "status", "successor", "deprecate_at"]
    list_filter = ["status", "family"]
    search_fields = ["slug"]


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = ["owner", "name", "base_model", "visibility", "r", "dtype", "size", "updated_at"]
    list_filter = ["visibility", "base_model"]
    search_fields = ["owner", "name"]


@admin.register(Revision)
class RevisionAdmin(admin.ModelAdmin):
    list_display = ["adapter", "sha", "kind", "created_at"]
    list_filter = ["kind"]


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "op", "status", "progress", "attempts", "owner", "created_at"]
    list_filter = ["status", "op"]


admin.site.register(Blob)
admin.site.register(Ref)
