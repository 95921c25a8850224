"""Nightly encrypted incremental backups of the mail data tree (docs/backups.md).

``store`` - where objects go (gs://, s3://, file://); ``backends`` - the implementations;
``crypto`` - the encrypted object format; ``manifest`` - the per-run manifest; ``layout`` -
object names and what a bucket listing says about sets and runs; ``archive`` - GNU tar
(create, check members, extract); ``state`` - the local state under ``<root>/backups``;
``run`` - the nightly run; ``retention`` - which sets go; ``restore`` - list, verify, restore.
"""


class BackupError(Exception):
    """A backup, list, verify or restore failed; the message says what and where."""
