"""The plugin's panel: no page and no menu entry, only the URL the script asks for its
stream (Horizon wraps it in its login and project checks)."""

import horizon
from django.utils.translation import gettext_lazy as _


class LivePanel(horizon.Panel):  # type: ignore[misc]
    name = _("Live updates")
    slug = "keel_live"
    nav = False
