"""LZ4 for the payload columns on PostgreSQL.

PostgreSQL compresses a ``jsonb`` value of more than about 2 KB before it stores it, with
pglz unless told otherwise. For the payloads a log holds, pglz costs the server three to four
times the CPU of LZ4, and it spends that CPU even on random text (hex, base64) that it then
fails to compress (``benchmarks/payload_storage.py``). Values already stored keep their
compression. The other databases, and PostgreSQL servers built without LZ4, are left as they
are.

The SQL is the migration's own (``django_rpc_audit.databases.set_payload_compression`` does the
same for a live table): a later change to that helper must not change what this migration did.
"""

from django.db import migrations


def _compress_with(method):
    def change(apps, schema_editor):
        connection = schema_editor.connection
        if connection.vendor != "postgresql":
            return
        with connection.cursor() as cursor:
            if method == "lz4":
                # Only a server built with LZ4 (Debian's, Docker's and the clouds' are) lists it.
                cursor.execute(
                    "SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
                    " WHERE name = 'default_toast_compression'"
                )
                row = cursor.fetchone()
                if not (row and row[0]):
                    return
            model = apps.get_model("django_rpc_audit", "RPCLog")
            quote = connection.ops.quote_name
            changes = ", ".join(
                f"ALTER COLUMN {quote(model._meta.get_field(name).column)}"
                f" SET COMPRESSION {method}"
                for name in ("params", "response")
            )
            cursor.execute(f"ALTER TABLE {quote(model._meta.db_table)} {changes}")

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
