from horizon import tables as horizon_tables
from keel_horizon_demo import tables


class IndexView(horizon_tables.DataTableView):
    table_class = tables.InstancesTable
    template_name = "keel_demo/index.html"
    page_title = "Keel demo"

    def get_data(self):
        return sorted(tables.rows(self.request).values(), key=lambda r: r.id)
