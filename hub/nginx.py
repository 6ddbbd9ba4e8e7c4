"""The nginx server block of docs/deploy.md ("nginx in front"), as one template: downloads
leave through X-Accel-Redirect (BLOB_ACCEL), staged upload bodies are stored by nginx
(UPLOAD_ACCEL). `manage.py nginx_conf` prints it for a site's settings; the tests and
benchmarks/bench_registry_io.py run nginx on it; a test keeps docs/deploy.md equal to it.
Standard library only."""

from __future__ import annotations

SERVER_BLOCK = """\
server {{{listen}
    location {accel_prefix} {{{accel_pad}# BLOB_ACCEL_PREFIX
        internal;                        # reachable only through X-Accel-Redirect
        alias {blob_root}/;{alias_pad}# BLOB_ROOT, with a trailing slash
        # On an internal redirect nginx drops the hub's own headers: put them back
        # (HF clients name their cache by the ETag = sha256, not nginx's mtime-size one).
        etag off;
        add_header ETag $upstream_http_etag;
        add_header X-Repo-Commit $upstream_http_x_repo_commit;
        add_header X-Linked-Etag $upstream_http_x_linked_etag;
        add_header X-Linked-Size $upstream_http_x_linked_size;
        add_header X-Revision $upstream_http_x_revision;
    }}
    location /api/v1/uploads/ {{          # staged uploads: nginx stores the body (UPLOAD_ACCEL=nginx)
        client_body_temp_path {body_root} 1 2;  # UPLOAD_ACCEL_ROOT: on BLOB_ROOT's filesystem
        client_body_in_file_only clean;  # the whole body in a file, removed after the request ("on" keeps it)
        client_body_buffer_size {body_buffer};      # written to that file in pieces this large
        client_max_body_size 0;          # MAX_UPLOAD_BYTES is enforced by the hub
        proxy_pass_request_body off;     # the hub gets the file's name, not its bytes
        proxy_set_header Content-Length "";
        proxy_set_header X-Upload-File $request_body_file;
        proxy_set_header X-Upload-Length $content_length;
        proxy_pass http://{upstream};
    }}
    location / {{
        proxy_pass http://{upstream};
        proxy_request_buffering off;     # other uploads stream to the hub, which spools them itself
        client_max_body_size 0;
        proxy_set_header X-Upload-File "";   # never pass a client's own
        proxy_set_header X-Upload-Length "";
    }}
}}
"""


def _pad(text: str, column: int) -> str:
    """Spaces that start a trailing comment at `column` (one space at least)."""
    return " " * max(1, column - len(text))


def server_block(*, upstream: str = "127.0.0.1:8000", blob_root: str = "/srv/hub/blobs",
                 accel_prefix: str = "/_blobs/", body_root: str | None = None, body_buffer: str = "1m",
                 listen: str | None = None) -> str:
    """The server block for a hub at `upstream` (host:port) whose blobs live in `blob_root`;
    `body_root` (UPLOAD_ACCEL_ROOT) defaults to `blob_root/.nginx-body`."""
    blob_root = str(blob_root).rstrip("/")
    head = f"    location {accel_prefix} {{"
    alias = f"        alias {blob_root}/;"
    return SERVER_BLOCK.format(
        listen=f"\n    listen {listen};" if listen else "", accel_prefix=accel_prefix, accel_pad=_pad(head, 41),
        blob_root=blob_root, alias_pad=_pad(alias, 41), body_root=body_root or f"{blob_root}/.nginx-body",
        body_buffer=body_buffer, upstream=upstream)


def standalone_conf(*, home: str, listen: str, upstream: str, blob_root: str, body_buffer: str = "1m",
                    as_root: bool = False) -> str:
    """A whole nginx.conf around server_block for a private nginx (`nginx -p home -c ...`):
    its pid, logs and temp folders in `home`, in the foreground. `as_root`: workers stay root
    (started as root they would drop to `nobody`, who cannot enter a private 0700 home)."""
    server = server_block(upstream=upstream, blob_root=blob_root, body_buffer=body_buffer, listen=listen)
    return "\n".join([
        "user root;" if as_root else "", "daemon off;", "worker_processes 1;", f"pid {home}/nginx.pid;",
        f"error_log {home}/error.log;", "events { worker_connections 64; }", "http {", "    access_log off;",
        *(f"    {kind}_temp_path {home}/{kind.split('_')[0]};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "    sendfile on;", "    proxy_read_timeout 900s;",
        *("    " + line if line else line for line in server.splitlines()), "}", ""])
