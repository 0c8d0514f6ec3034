"""A real S3 server for the tests: moto's server mode (`moto[server]` from PyPI), started on
127.0.0.1 at a free port in its own process, with IAM enforced, so that credentials and permissions
are checked as S3 checks them. Also a TCP proxy in front of it whose connections can be cut, for
network failures mid-harvest.

Users: `writer` may do anything; `reader` may list and read everything but write only under
`s3://{BUCKET}/scratch/`, so any other prefix is read-only to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "jumpscope-tests"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    keys: dict          # user -> (access key id, secret)

    def env(self, user: str = "writer", endpoint: str | None = None) -> dict:
        """The standard AWS variables a user of the store sets (boto3 reads AWS_DEFAULT_REGION)."""
        key, secret = self.keys[user]
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}

    def client(self, user: str = "writer"):
        import boto3
        e = self.env(user)
        return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"], region_name=REGION,
                            aws_access_key_id=e["AWS_ACCESS_KEY_ID"], aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])

    def list_keys(self, prefix: str) -> list[str]:
        """The keys under `prefix`, relative to it, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under `prefix` (no leading or trailing slash): key relative to it -> bytes."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        return out

    def digest(self, prefix: str) -> dict[str, str]:
        """Like tests.harvest_util.tree_digest: relative key -> sha256."""
        return {k: hashlib.sha256(v).hexdigest() for k, v in sorted(self.objects(prefix).items())}

    def upload(self, folder: Path, prefix: str) -> str:
        """Copy a local cache folder to s3://BUCKET/prefix (keys = relative paths); returns the URL."""
        from concurrent.futures import ThreadPoolExecutor
        s3 = self.client()
        files = [f for f in sorted(Path(folder).rglob("*")) if f.is_file()]
        with ThreadPoolExecutor(8) as pool:           # boto3 clients are thread-safe
            list(pool.map(lambda f: s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.relative_to(folder)}",
                                                  Body=f.read_bytes()), files))
        return f"s3://{BUCKET}/{prefix}"


def _setup(endpoint: str) -> dict:
    """Bucket, users, policies and keys: exactly SETUP_ACTIONS unauthenticated requests."""
    import boto3
    kw = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **kw)
    policies = {
        "writer": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        "reader": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"},
                   {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
                    "Resource": f"arn:aws:s3:::{BUCKET}/scratch/*"}],
    }
    keys = {}
    for user, statements in policies.items():
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="cache",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    return keys


SETUP_ACTIONS = 1 + 2 * 3


def start_server() -> S3Server:
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_ACTIONS))   # then IAM is enforced
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)      # not an S3 action: not counted
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.1)
    server = S3Server(endpoint, proc, _setup(endpoint))
    server.keys["nobody"] = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    return server


def s3_fixture():
    """A module-scoped fixture: the server, or a clean skip when its packages cannot be imported."""
    @pytest.fixture(scope="module")
    def s3():
        pytest.importorskip("obstore", reason="the object-store extra is not installed: pip install -e '.[s3]'")
        pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[test-remote]'")
        server = start_server()
        try:
            yield server
        finally:
            server.process.kill()
            server.process.wait()
    return s3


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 in front of `target_port`; cut() drops every connection and
    refuses new ones (a network failure), restore() serves again on the same port."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.lock, self.conns, self.listener = threading.Lock(), [], None
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.listener.close()
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.conns = []

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
