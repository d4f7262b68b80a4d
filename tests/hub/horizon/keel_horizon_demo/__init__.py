"""A Horizon panel for the plugin's test: one table of "instances" with ajax-update rows,
read from the JSON file ``KEEL_DEMO_ROWS`` (``{project_id: [{"id", "name", "status"}]}``)
that the test rewrites, as a cloud's services would change their resources."""
