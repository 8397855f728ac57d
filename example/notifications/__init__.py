"""The example app: views that make RPC calls, demo handlers, a failure webhook, ``rpc_demo``."""
