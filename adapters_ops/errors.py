"""Every error the tensor library raises on bad input is an AdapterError, so
callers (the API, the workers, hubctl) can turn it into a clear message."""


class AdapterError(ValueError):
    """Bad input to an adapter operation. `code` is a short machine-readable name."""

    code = "invalid_adapter"

    def __init__(self, detail: str, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code


class IncompatibleAdapters(AdapterError):
    code = "incompatible_adapters"


class CorruptFile(AdapterError):
    code = "corrupt_file"
