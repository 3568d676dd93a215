"""Filesystems for shard paths: local folders and `s3://bucket/prefix` through s3fs.

    fs, root = resolve("s3://bkt/shards", s3_cfg)   # s3fs.S3FileSystem, "bkt/shards"
    fs, root = resolve("data/shards", s3_cfg)       # LocalFileSystem, "/abs/data/shards"

S3 endpoint and credentials come from the config when set, else from the standard AWS environment
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), which s3fs/botocore read.
"""
from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..config import S3Config

S3_PREFIX = "s3://"


def is_s3(path: str) -> bool:
    return path.startswith(S3_PREFIX)


def s3_filesystem(cfg: S3Config) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem for `cfg` (no instance cache: each config gets its own client)."""
    import s3fs

    client_kwargs = {}
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    kwargs = dict(anon=cfg.anon, client_kwargs=client_kwargs, skip_instance_cache=True,
                  config_kwargs={"retries": {"max_attempts": cfg.retries, "mode": "standard"},
                                 "connect_timeout": cfg.connect_timeout, "read_timeout": cfg.read_timeout})
    if cfg.access_key_id:
        kwargs.update(key=cfg.access_key_id, secret=cfg.secret_access_key)
    return s3fs.S3FileSystem(**kwargs)


def resolve(path: str, cfg: S3Config) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URL."""
    if is_s3(path):
        return s3_filesystem(cfg), path[len(S3_PREFIX):].rstrip("/")
    return LocalFileSystem(), os.path.abspath(path)


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing form of `path` (s3:// restored for S3)."""
    return path if isinstance(fs, LocalFileSystem) else S3_PREFIX + path
