"""The one error root of the hub: every refusal is a HubError with a `code`
for machines, a `detail` for people, the `field` at fault when there is one,
and its HTTP `status`. The REST API maps it in one place
(hub/api/errors.py); the HF routes and the UI read the same attributes.

Standard library only: upload validation raises these without Django.
"""

from __future__ import annotations


class HubError(Exception):
    status = 400
    code = "invalid"

    def __init__(self, detail: str, *, code: str | None = None, field: str | None = None,
                 status: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.field = field
        if code:
            self.code = code
        if status:
            self.status = status
