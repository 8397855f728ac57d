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
    path("sync/stream/", views.sync_stream),
    path("async/stream/", views.async_stream),
    path("sync/login-then-call/", views.sync_login_then_call),
    path("sync/logout-then-call/", views.sync_logout_then_call),
    path("async/login-then-call/", views.async_login_then_call),
    path("async/logout-then-call/", views.async_logout_then_call),
    path("call/<str:method>/", views.call_method),
    path("metrics/", metrics_view),
]
