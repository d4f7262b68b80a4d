"""Keel's Horizon plugin: table rows refreshed by the hub's events, not by polling.

A Django app for Horizon (enable it by copying ``enabled/_9100_keel_live.py`` into
``openstack_dashboard/local/enabled/`` and setting ``KEEL_HUB_URL``). On every page with
ajax-update rows its script opens one ``EventSource`` to the hub for the logged-in user's
project and, for each event, refreshes the rows whose object id is the event's subject
through ``horizon.datatables``' own row-update path (the row's ``row_update`` URL, replaced
as Horizon replaces it). While the stream is open Horizon's periodic polls are skipped;
while it is down they run as before, at ``ajax_poll_interval``.

The stream is a Zaqar queue of the project (``keel-horizon-live``) whose ``_keel_filter``
takes every event of the project, read through a signed URL for GET on its messages: the
browser never holds the user's Keystone token, only a capability for that queue, for
``KEEL_LIVE_URL_LIFETIME`` seconds. Nothing here imports Django at package import, so the
package also imports where Django is not installed.
"""
