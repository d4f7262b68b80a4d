from django.urls import re_path
from keel_horizon_demo import views

urlpatterns = [re_path(r"^$", views.IndexView.as_view(), name="index")]
