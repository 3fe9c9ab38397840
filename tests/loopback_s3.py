"""A real S3 API on loopback for tests: moto's server mode on 127.0.0.1 (a free port), one bucket, credentials in
the environment for the duration (moto accepts any; LanceDB and boto3 need some to sign requests)."""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

REGION = "us-east-1"
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class LoopbackS3:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    options: dict[str, str]  # store.storage_options for this server (no credentials)

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def keys(self, prefix: str) -> list[str]:
        found = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix.strip("/") + "/")
        return sorted(obj["Key"] for obj in found.get("Contents", []))


@contextmanager
def loopback_s3(bucket: str = "ampo-test") -> Iterator[LoopbackS3]:
    """Start moto's threaded server on a free loopback port, create `bucket`, set test credentials and the region
    in os.environ; stop it and restore the environment on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        with mock.patch.dict(os.environ, {**TEST_CREDENTIALS, "AWS_REGION": REGION}):
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            s3 = LoopbackS3(endpoint, bucket, {"endpoint": endpoint, "region": REGION, "allow_http": "true"})
            s3.client().create_bucket(Bucket=bucket)
            yield s3
    finally:
        server.stop()
