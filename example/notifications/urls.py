"""URLs of the demo app's views."""

from __future__ import annotations

from django.urls import path

from notifications import views

app_name = "notifications"

urlpatterns = [
    path("", views.index, name="index"),
    path("api/ping/", views.ping, name="ping"),
    path("api/notify/", views.notify, name="notify"),
    path("api/reports/", views.reports, name="reports"),
    path("api/async/ping/", views.aping, name="aping"),
    path("api/async/notify/", views.anotify, name="anotify"),
    path("api/async/echo/", views.aecho, name="aecho"),
]
