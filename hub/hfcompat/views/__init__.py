"""Routes that speak the Hugging Face Hub protocol, so `huggingface_hub`,
`peft` and adapter servers (LoRAX) pull from and push to this hub unmodified
with `HF_ENDPOINT` pointing here (see docs/hf-compat.md and
/work/shared/HF_PROTOCOL.md).

Repo ids: `owner/name` is an adapter; a single segment is a base model slug
(read-only, one revision whose commit id is `BaseModel.sha`, ref `main`).

Plain Django views: the clients need exact status codes and headers
(`X-Error-Code`, `X-Repo-Commit`, ETag), and errors carry the readable text in
`error`, which huggingface_hub prints. Visibility comes from
`selectors.adapter_get` (`Adapter.objects.visible_to`): a repo the caller may
not see answers 404 RepoNotFound, exactly like one that does not exist.
Writes take a bearer token only (never the session cookie), which is why the
POST routes can be CSRF-exempt.

Cut along its seams: `errors` (HF-style errors, `hf_route`), `auth` (who is
asking, whoami), `snapshots` (a revision's files and the generated card),
`listings` (model_info, tree, refs), `downloads` (resolve) and `commits` (repo
create/delete/settings, validate-yaml, preupload, commit). This package
re-exports the routes `urls.py` names.
"""

from .auth import read_user, token_user, whoami
from .commits import commit, preupload, repo_create, repo_delete, repo_settings, validate_yaml
from .downloads import resolve
from .errors import HfError, error_response, hf_route
from .listings import model_info, refs, tree
from .snapshots import Entry, Snapshot, repo_get, snapshot

__all__ = [
    "Entry", "HfError", "Snapshot", "commit", "error_response", "hf_route", "model_info", "preupload", "read_user",
    "refs", "repo_create", "repo_delete", "repo_get", "repo_settings", "resolve", "snapshot", "token_user", "tree",
    "validate_yaml", "whoami",
]
