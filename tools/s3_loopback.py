"""A real S3 protocol server on 127.0.0.1 for tests and `make bench-data`: moto's server mode in its own
process, with authentication enforced (an IAM user made through the server's first unauthenticated
requests).

The process environment points the AWS clients at it (AWS_ENDPOINT_URL, the user's keys), as a user
would point them at a bucket. Clients reach it through a TCP relay the tests can cut (`cut()`: every
open connection breaks and new ones are refused) and restore, as a network that goes away."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import fsspec

UNAUTHENTICATED_SETUP_REQUESTS = 3  # create the user, give it a policy, make its access key


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Relay:
    """Forwards TCP connections from its own port to `target_port` on 127.0.0.1."""

    def __init__(self, target_port):
        self.port, self.target_port = free_port(), target_port
        self.listener, self.connections, self.lock = None, [], threading.Lock()

    def restore(self):
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self):
        # shutdown first: a bare close leaves the socket listening while its thread is blocked in accept(), and
        # with reuse_port a restored listener would then share the port with it (connections left unaccepted).
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for connection in self.connections:
                connection.close()
            self.connections.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()


class S3Server:
    def __init__(self):
        self.port = free_port()
        self.process = None

    def start(self):
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNAUTHENTICATED_SETUP_REQUESTS)}
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"moto server did not start on port {self.port}")
            time.sleep(0.2)
        self.relay = Relay(self.port)
        self.relay.restore()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.relay.port}", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ACCESS_KEY_ID="setup", AWS_SECRET_ACCESS_KEY="setup")
        import boto3

        iam = boto3.client("iam")
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="everything", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        return self

    def stop(self):
        if self.process is not None:
            self.relay.cut()
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def filesystem(self):
        return fsspec.filesystem("s3", skip_instance_cache=True)

    def upload_folder(self, folder, location):
        """Copy every file of `folder` to the s3:// `location` (the bucket is made when missing)."""
        fs = self.filesystem()
        bucket = location.removeprefix("s3://").split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{location.removeprefix('s3://')}/{path.name}")
