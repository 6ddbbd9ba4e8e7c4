"""Upload handling: every uploaded file is spooled to a temporary file while
its bytes are counted and hashed, so validation and blob keys need no second
read, memory stays flat, and an upload past the cap stops with a 413."""

import hashlib

from django.conf import settings
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from rest_framework.exceptions import APIException


class UploadTooLarge(APIException):
    status_code = 413
    default_code = "upload_too_large"
    default_detail = "The upload is larger than the hub accepts."


class HashingUploadHandler(TemporaryFileUploadHandler):
    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > settings.MAX_UPLOAD_BYTES:
            raise UploadTooLarge(
                f"The upload is {content_length} bytes; the limit is {settings.MAX_UPLOAD_BYTES} bytes."
            )
        self.total = 0
        return super().handle_raw_input(input_data, META, content_length, boundary, encoding)

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self.sha = hashlib.sha256()
        self.size = 0

    def receive_data_chunk(self, raw_data, start):
        self.sha.update(raw_data)
        self.size += len(raw_data)
        self.total = getattr(self, "total", 0) + len(raw_data)
        if self.total > settings.MAX_UPLOAD_BYTES:
            raise UploadTooLarge(f"The upload passed the limit of {settings.MAX_UPLOAD_BYTES} bytes.")
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size):
        f = super().file_complete(file_size)
        f.sha256 = self.sha.hexdigest()
        return f
