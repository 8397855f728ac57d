"""The example app: views that make RPC calls, demo handlers, ``rpc_demo``."""
