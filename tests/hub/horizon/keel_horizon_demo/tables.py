import json
from types import SimpleNamespace

from django.conf import settings
from django.http import Http404
from horizon import tables


def rows(request):
    with open(settings.KEEL_DEMO_ROWS) as f:
        data = json.load(f)
    return {row["id"]: SimpleNamespace(**row) for row in data.get(request.user.project_id, [])}


class UpdateRow(tables.Row):
    ajax = True

    def get_data(self, request, obj_id):
        row = rows(request).get(obj_id)
        if row is None:
            raise Http404(obj_id)
        return row


class InstancesTable(tables.DataTable):
    name = tables.Column("name", verbose_name="Name")
    status = tables.Column(
        "status",
        verbose_name="Status",
        status=True,
        status_choices=(("active", True), ("error", False), ("building", None)),
    )

    class Meta:
        name = "instances"
        verbose_name = "Instances"
        row_class = UpdateRow
        status_columns = ("status",)
