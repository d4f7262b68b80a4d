# The test panel of Keel's Horizon plugin (tests/hub/horizon/test_horizon_live.py).
PANEL = "keel_demo"
PANEL_DASHBOARD = "project"
ADD_PANEL = "keel_horizon_demo.panel.DemoPanel"
ADD_INSTALLED_APPS = ["keel_horizon_demo"]
