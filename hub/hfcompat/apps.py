from django.apps import AppConfig


class HfCompatConfig(AppConfig):
    name = "hub.hfcompat"
    label = "hfcompat"
