from django.urls import re_path

from keel.hub.horizon import views

urlpatterns = [re_path(r"^stream/$", views.stream, name="stream")]
