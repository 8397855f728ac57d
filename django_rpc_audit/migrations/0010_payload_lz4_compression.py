"""LZ4 for the payload columns on PostgreSQL.

PostgreSQL compresses a ``jsonb`` value of more than about 2 KB before it stores it, with
pglz unless told otherwise. For the payloads a log holds, pglz costs the server three to four
times the CPU of LZ4, and it spends that CPU even on random text (hex, base64) that it then
fails to compress (``benchmarks/payload_storage.py``). Values already stored keep their
compression. The other databases, and PostgreSQL servers built without LZ4, are left as they
are.
"""

from django.db import migrations

from django_rpc_audit.databases import PAYLOAD_FIELDS, set_payload_compression


def _compress_with(method):
    def change(apps, schema_editor):
        model = apps.get_model("django_rpc_audit", "RPCLog")
        columns = tuple(model._meta.get_field(name).column for name in PAYLOAD_FIELDS)
        set_payload_compression(schema_editor.connection, model._meta.db_table, columns, method)

    return change


class Migration(migrations.Migration):

    dependencies = [
        ('django_rpc_audit', '0009_daily_rollups'),
    ]

    operations = [
        migrations.RunPython(
            _compress_with("lz4"), _compress_with("default"), hints={"model_name": "rpclog"}
        ),
    ]
