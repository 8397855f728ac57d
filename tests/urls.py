from django.contrib import admin
from django.urls import path

from django_rpc_audit.integrations.prometheus import metrics_view
from tests import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("sync/call/", views.sync_call),
    path("async/call/", views.async_call),
    path("sync/no-call/", views.sync_no_call),
    path("async/no-call/", views.async_no_call),
    path("sync/raises/", views.sync_raises),
    path("async/raises/", views.async_raises),
    path("call/<str:method>/", views.call_method),
    path("metrics/", metrics_view),
]
