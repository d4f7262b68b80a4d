from django.apps import AppConfig


class KeelHorizonConfig(AppConfig):  # type: ignore[misc]
    # The default label would be "horizon", Horizon's own.
    name = "keel.hub.horizon"
    label = "keel_horizon"
    verbose_name = "Keel live updates"
