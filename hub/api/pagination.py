from rest_framework.pagination import PageNumberPagination

from hub.registry.validation import ValidationError, ascii_digits


def _positive(raw: str) -> bool:
    return ascii_digits(raw) and int(raw) >= 1


class Pagination(PageNumberPagination):
    """DRF's page numbers, strict: a page_size or page that is not a positive
    integer (empty too) is a 400, where DRF would quietly use the default size
    or page 1, or answer 404. A page past the last is still a 404."""

    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not _positive(raw):
            raise ValidationError("invalid_page_size", "page_size must be a positive integer.", field="page_size")
        return min(int(raw), self.max_page_size)

    def get_page_number(self, request, paginator):
        raw = request.query_params.get(self.page_query_param)
        if raw is not None and raw not in self.last_page_strings and not _positive(raw):
            raise ValidationError("invalid_page", "page must be a positive integer (or 'last').", field="page")
        return super().get_page_number(request, paginator)

    def get_schema_operation_parameters(self, view):
        params = super().get_schema_operation_parameters(view)
        for p in params:
            p["schema"]["minimum"] = 1
            if p["name"] == self.page_size_query_param:
                p["description"] = f"Number of results to return per page (at most {self.max_page_size}: more is capped)."
        return params
