# Keel's Horizon plugin: copy into openstack_dashboard/local/enabled/ (see
# keel.hub.horizon). Adds the app, its one (hidden) panel that hands out the stream URL,
# and its script to every page.
PANEL = "keel_live"
PANEL_DASHBOARD = "project"
ADD_PANEL = "keel.hub.horizon.panel.LivePanel"
ADD_INSTALLED_APPS = ["keel.hub.horizon"]
ADD_JS_FILES = ["keel/horizon/live.js"]
