"""The example project of django-rpc-audit."""
