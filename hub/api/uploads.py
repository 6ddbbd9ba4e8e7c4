"""Staged uploads: `PUT /api/v1/uploads/{sha256}` takes one file as the raw
request body, `HEAD` says whether the caller may already name it in a commit.

`hubctl push` and `base add` send a folder's files this way, several at once,
skipping those the hub has (a re-run resumes), then make one commit naming
them by sha256 (`POST /api/v1/adapters/` or `base-models/` with JSON).

Every PUT is resumable (hub/registry/partial_uploads.py): the body, the whole
file or with `Content-Range` a part of it, is written to a partial file and
hashed as it arrives (read off gunicorn's socket, hub/registry/request_body.py),
413 past `MAX_UPLOAD_BYTES` before any byte is kept; a client cut off halfway
learns from HEAD's `Upload-Offset` where to continue. The whole file is
checked against the sha256 in the URL and linked into the store.

With `UPLOAD_ACCEL=nginx` the front server stores the body itself and sends
only its path (`X-Upload-File`) and length (`X-Upload-Length`): the hub
checks, hashes and links that file and never reads the body. Without the
setting that header is refused, never followed (docs/deploy.md).
"""

import os
from contextlib import ExitStack

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, serializers
from rest_framework.response import Response

from hub.api.base import ApiView
from hub.api.errors import error_response
from hub.api.schema import error
from hub.registry import services
from hub.registry.partial_uploads import (
    ContentRange,
    UploadConflict,
    parse_content_range,
    receive_range,
    received_bytes,
)
from hub.registry.request_body import body_reader
from hub.registry.services import IncomingFile
from hub.registry.uploads import UploadTooLarge, open_front_server_upload
from hub.registry.validation import ValidationError
from hub.storage import hash_open_file

SHA256 = r"[0-9a-f]{64}"


class StagedSerializer(serializers.Serializer):
    sha256 = serializers.CharField()
    size = serializers.IntegerField()


class PartialSerializer(StagedSerializer):
    received = serializers.IntegerField()


class Upload(ApiView):
    permission_classes = [permissions.IsAuthenticated]
    parser_classes = []  # PUT streams its body itself (streams_body); nothing else has one

    def streams_body(self, request) -> bool:
        return request.method == "PUT"

    def initial(self, request, *args, **kwargs):
        # Before anything reads the body: a file name from the client is never followed.
        if request.method == "PUT" and "HTTP_X_UPLOAD_FILE" in request.META and settings.UPLOAD_ACCEL != "nginx":
            raise ValidationError("upload_file_header_refused", "X-Upload-File is only accepted from the hub's "
                                  "front server (UPLOAD_ACCEL=nginx); send the file as the body.")
        super().initial(request, *args, **kwargs)

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={201: StagedSerializer, 200: StagedSerializer,
                   202: OpenApiResponse(PartialSerializer, description="A part with Content-Range arrived; the "
                                        "file is not whole yet. Upload-Offset: the bytes the hub holds."),
                   400: error(400), 409: error(409, "The part does not start at Upload-Offset "
                                                    "(upload_offset_mismatch), or another request is sending "
                                                    "this file (upload_in_progress)."),
                   411: error(400, "No Content-Length: send the file with one."), 413: error(413)},
        description="Stage one file for a commit: the raw body, whose sha256 must be the one in the URL. "
                    "201 when newly staged, 200 when this user had staged it already. With "
                    "`Content-Range: bytes START-END/TOTAL` the body is a part of the file, kept as it arrives: "
                    "a transfer cut off halfway resumes from the byte HEAD's Upload-Offset names. "
                    "`Content-Range: bytes */TOTAL` with an empty body says where the upload stands, and "
                    "stages it if every byte has arrived.",
    )
    def put(self, request, sha256):
        try:
            if "HTTP_CONTENT_RANGE" in request.META:
                rng = parse_content_range(request.META["HTTP_CONTENT_RANGE"])
            elif settings.UPLOAD_ACCEL == "nginx" and "HTTP_X_UPLOAD_FILE" in request.META:
                return self._put_front_server_file(request, sha256, request.META["HTTP_X_UPLOAD_FILE"])
            elif not request.META.get("CONTENT_LENGTH", "").isdigit():  # a chunked body would read as empty
                return Response({"error": "length_required",
                                 "detail": "Send the file with a Content-Length header."}, status=411)
            else:  # the whole file: the same resumable path, from byte 0 (an empty file has no byte range)
                length = int(request.META["CONTENT_LENGTH"])
                rng = ContentRange(0, length - 1, length) if length else ContentRange(None, None, 0)
            return self._put_range(request, sha256, rng)
        except UploadConflict as e:
            headers = {} if e.received is None else {"Upload-Offset": str(e.received)}
            return error_response(e.code, e.detail, e.status, headers=headers)

    def _put_range(self, request, sha256, rng):
        """A resumable part (hub/registry/partial_uploads.py): 202 with the bytes
        held so far until the file is whole, then staged as 201 or 200."""
        declared = request.META.get("HTTP_X_UPLOAD_LENGTH") if "HTTP_X_UPLOAD_FILE" in request.META else None
        length = declared if declared is not None else request.META.get("CONTENT_LENGTH") or ""
        if rng.start is None and length not in ("", "0"):
            raise ValidationError("bad_content_range", "Content-Range 'bytes */TOTAL' asks where the upload "
                                  "stands or finishes it: send it with an empty body.")
        if rng.start is not None and not length.isdigit():
            return Response({"error": "length_required", "detail": "Send the part with a Content-Length header."},
                            status=411)
        if rng.start is not None and int(length) != rng.length:
            raise ValidationError("bad_content_range", f"The body has {length} bytes; Content-Range "
                                  f"{rng.start}-{rng.end} names {rng.length}.")
        with ExitStack() as stack:
            front = None
            if "HTTP_X_UPLOAD_FILE" in request.META and rng.start is not None:
                if rng.start == 0 and rng.length == rng.total:  # the whole file in nginx's hands: link it
                    return self._put_front_server_file(request, sha256, request.META["HTTP_X_UPLOAD_FILE"])
                front = stack.enter_context(open_front_server_upload(request.META["HTTP_X_UPLOAD_FILE"]))
                if os.fstat(front.fileno()).st_size != rng.length:
                    raise ValidationError("incomplete_body", "The front server's file of this part is not the "
                                          "part's length; nothing was kept.")
            body = None if front else body_reader(request.META, request.stream, rng.length)
            got = stack.enter_context(receive_range(request.user.pk, sha256, rng, body=body, front_file=front))
            if got.complete is None:
                return Response({"sha256": sha256, "size": got.total, "received": got.received}, status=202,
                                headers={"Upload-Offset": str(got.received)})
            upload = IncomingFile(path=sha256, fileobj=got.complete, sha256=got.sha256, size=got.total)
            blob, created = services.stage_upload(user=request.user, sha256=sha256, upload=upload)
        return Response({"sha256": blob.sha256, "size": blob.size}, status=201 if created else 200)

    def _put_front_server_file(self, request, sha256, path):
        """nginx stored the body in `path` (client_body_in_file_only) and sent its
        Content-Length as X-Upload-Length: check, hash in large reads, stage."""
        declared = request.META.get("HTTP_X_UPLOAD_LENGTH", "")
        if not declared.isdigit():
            return Response({"error": "length_required", "detail": "Send the file with a Content-Length header."},
                            status=411)
        if int(declared) > settings.MAX_UPLOAD_BYTES:
            raise UploadTooLarge(f"The upload is {declared} bytes; the limit is {settings.MAX_UPLOAD_BYTES} bytes.")
        with open_front_server_upload(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > settings.MAX_UPLOAD_BYTES:
                raise UploadTooLarge(f"The upload passed the limit of {settings.MAX_UPLOAD_BYTES} bytes.")
            if size != int(declared):
                raise ValidationError("incomplete_body", f"The body has {size} bytes, not the {declared} its "
                                      "Content-Length says; nothing was kept.")
            digest, size = hash_open_file(f)
            upload = IncomingFile(path=sha256, fileobj=f, sha256=digest, size=size)
            blob, created = services.stage_upload(user=request.user, sha256=sha256, upload=upload)
        return Response({"sha256": blob.sha256, "size": blob.size}, status=201 if created else 200)

    @extend_schema(
        responses={200: OpenApiResponse(description="This user staged the blob, or may read it already."),
                   404: OpenApiResponse(description="Not staged by this user (send it with PUT). With an "
                                        "Upload-Offset header: the bytes of a resumable PUT the hub holds.")},
        description="Whether a commit of this user may name the blob without sending it again.",
    )
    def head(self, request, sha256):
        blob = services.usable_blobs(request.user, [sha256]).get(sha256)
        if blob is None:
            received = received_bytes(request.user.pk, sha256)
            return Response(status=404, headers={} if received is None else {"Upload-Offset": str(received)})
        return Response(status=200, headers={"ETag": f'"{blob.sha256}"', "X-Blob-Size": str(blob.size)})
