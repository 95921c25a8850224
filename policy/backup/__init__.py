"""Nightly encrypted incremental backups of the mail data tree (docs/backups.md).

``store`` - where objects go (gs://, s3://, file://); ``backends`` - the implementations;
the archive, encryption, state, run, list, verify and restore modules build on them.
"""
