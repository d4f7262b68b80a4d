"""The Zaqar v2 API on the hub: a face over the hub's core and stores (see the Zaqar section
of docs/hub-api.md for what is served, what is not, and where it differs from Zaqar)."""

from keel.hub.zaqar._config import ZaqarConfig
from keel.hub.zaqar._routes import zaqar_routes
from keel.hub.zaqar._signed import SignedURL, allows, sign

__all__ = ["SignedURL", "ZaqarConfig", "allows", "sign", "zaqar_routes"]
