"""A real S3 endpoint for tests: moto's standalone server over HTTP on loopback.

Pytest-free so any test module (or a script) can use it:

    with moto_server() as endpoint:
        env = fake_aws_env(endpoint)   # apply with monkeypatch.setenv / a subprocess env
        ...

`moto_server` sets no environment variables and touches no global configuration; the
caller decides how clients find the endpoint and credentials. One caveat is moto's:
its backends are process-wide, so two servers in one process share buckets. Tests
should use their own bucket names (see `unique_bucket`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

# Variables that would point a client somewhere other than the test server, or lend it
# real credentials, if inherited from the developer's shell.
AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Start a moto S3 server on a free 127.0.0.1 port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Port 0: the kernel picks a free port at bind time, so there is no window in which
    # another process can take a port we probed.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        # stop() shuts the serve loop down but leaves the listening socket open.
        wsgi = getattr(server, "_server", None)
        if wsgi is not None:
            wsgi.server_close()


def fake_aws_env(endpoint_url: str | None = None, region: str = "us-east-1") -> dict[str, str]:
    """Environment for a boto3 client that talks to the test server with dummy keys.

    Also points the shared config/credentials files at nowhere so ~/.aws is ignored.
    Pair with AWS_ENV_TO_CLEAR.
    """
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_CONFIG_FILE": "/nonexistent/framefarm-test-aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/framefarm-test-aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    if endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = endpoint_url
    return env


def unique_bucket(stem: str = "test") -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}"
