from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "hub.api"
    label = "api"

    def ready(self):
        from . import auth  # noqa: F401  (registers the OpenAPI auth extension)
