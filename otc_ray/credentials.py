"""Credentials stay in the environment, never in what Ray ships or MLflow stores.

Ray keeps the arguments of tasks and actors, the train function and its config (`str()` of it in the Train run
state), and what workers print (session logs). So the driver moves every secret of its config into its own
process environment, the place the standard credential chains read, and hands Ray a config without them:

    cfg = move_secrets_to_env(cfg)      # before init_ray: a local Ray instance inherits this environment
    cfg.data.s3.access_key_id           # "" (now AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    cfg.tracking.uri                    # "https://mlflow.internal" (user / password now MLFLOW_TRACKING_USERNAME /
                                        # MLFLOW_TRACKING_PASSWORD, which MLflow's client reads on every request)

On a cluster, workers on other nodes do not see the driver's environment: they take S3 and MLflow credentials from
their node (instance profile, IRSA, or the variables above set on the node), never from the job's arguments.
`redact_uri` (defined with the config, whose MLflow params show URIs redacted) is for anything printed:
"https://user:***@host".

Top level: the data readers, the tracking client and the pipelines all use it, and it depends on the config
alone.
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

from .config import Config, S3Config, redact_uri, replace

__all__ = ["move_secrets_to_env", "redact_uri", "split_uri_credentials", "without_keys"]

AWS_KEY_ENV, AWS_SECRET_ENV = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
MLFLOW_USER_ENV, MLFLOW_PASSWORD_ENV, MLFLOW_URI_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                                         "MLFLOW_TRACKING_URI")


def _netloc_without_userinfo(netloc: str) -> str:
    return netloc.rpartition("@")[2]


def split_uri_credentials(uri: str) -> tuple[str, str, str]:
    """(uri without user:password, user, password) of a URI; ("uri", "", "") when it carries none."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, "", ""
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    clean_uri = urlunsplit(parts._replace(netloc=_netloc_without_userinfo(parts.netloc)))
    return clean_uri, unquote(user), unquote(password)


def without_keys(s3: S3Config) -> S3Config:
    """`s3` with no access keys: what is shipped to Ray tasks and actors (they read the credential chain)."""
    return replace(s3, access_key_id="", secret_access_key="")


def move_secrets_to_env(cfg: Config) -> Config:
    """Export the config's S3 keys and the tracking URI's user / password (tracking.uri, else $MLFLOW_TRACKING_URI)
    to this process's environment; return the config without them (also $MLFLOW_TRACKING_URI is left without them).
    Idempotent: a config without secrets comes back unchanged."""
    s3 = cfg.data.s3
    if s3.access_key_id or s3.secret_access_key:
        os.environ[AWS_KEY_ENV] = s3.access_key_id
        os.environ[AWS_SECRET_ENV] = s3.secret_access_key
        os.environ.pop("AWS_SESSION_TOKEN", None)            # belongs to other keys
        cfg = replace(cfg, data__s3__access_key_id="", data__s3__secret_access_key="")
    clean_uri, user, password = split_uri_credentials(cfg.tracking.uri)
    if user or password:
        cfg = replace(cfg, tracking__uri=clean_uri)
    else:
        env_clean_uri, user, password = split_uri_credentials(os.environ.get(MLFLOW_URI_ENV, ""))
        if user or password:
            os.environ[MLFLOW_URI_ENV] = env_clean_uri
    if user:
        os.environ[MLFLOW_USER_ENV] = user
    if password:
        os.environ[MLFLOW_PASSWORD_ENV] = password
    return cfg
