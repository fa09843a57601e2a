"""A real S3-compatible store for tests: moto's server on 127.0.0.1 (a free port), with the environment boto3,
streaming and Composer read (`S3_ENDPOINT_URL`, dummy credentials), inherited by launched processes."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

BUCKET = 'shear-test'
ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_DEFAULT_REGION': 'us-east-1',
       'AWS_CONFIG_FILE': os.devnull, 'AWS_SHARED_CREDENTIALS_FILE': os.devnull}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """moto's S3 server process; `stop` and `start` it again (same port, same objects are lost) to fake an
    outage."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        self.proc = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f'moto server did not start on {self.url}') from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self):
        import boto3
        return boto3.client('s3', endpoint_url=self.url)

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)['Body'].read()

    def keys(self, prefix: str = '') -> list[str]:
        pages = self.client().get_paginator('list_objects_v2').paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o['Key'] for page in pages for o in page.get('Contents', []))


@contextlib.contextmanager
def s3_store() -> Iterator[Server]:
    """A started server with an empty bucket `BUCKET`; the environment points at it until the block ends."""
    server = Server()
    saved = {k: os.environ.get(k) for k in (*ENV, 'S3_ENDPOINT_URL')}
    os.environ.update(ENV, S3_ENDPOINT_URL=server.url)
    server.start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
