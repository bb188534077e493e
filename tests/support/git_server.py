"""
A private git host for the tests: C{git http-backend} (git's smart HTTP, as
a CGI program) behind a small HTTPS server on loopback, with a certificate
made at test time, that answers only requests carrying
C{Authorization: Basic base64(x-access-token:<token>)} (GitHub's form for a
token) and says 401 to anything else.

    with GitServer(tmp_path, token) as server:
        server.create("owner/private")       # a bare repository with one commit
        server.url                           # https://127.0.0.1:PORT
        server.ca                            # the certificate's file (PEM)
        server.log_of(path)                  # what git pushed, as the server sees it

Bodies go to the CGI and back as they come (no whole pack held).  It runs
in threads of the test's process: no Twisted.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import os
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """
    A key and a certificate for 127.0.0.1 and localhost, valid for a day.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capsule test git host")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "git-host-key.pem", directory / "git-host-cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        owner = self.server.owner
        authorization = self.headers.get("Authorization", "")
        owner.seen.append((self.command, self.path, authorization,
                           self.headers.get("X-Capsule-Session")))
        if authorization != owner.authorization:
            body = b"Invalid username or token.\n"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="GitHub"')
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        path, _, query = self.path.partition("?")
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(owner.root),
               "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": self.command, "PATH_INFO": path,
               "QUERY_STRING": query, "REMOTE_USER": "x-access-token",
               "REMOTE_ADDR": self.client_address[0],
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), **GIT_ENV}
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if chunked and path.endswith("/git-receive-pack"):
            owner.pushed_chunked = True
        length = int(self.headers.get("Content-Length") or 0)
        if not chunked:
            env["CONTENT_LENGTH"] = str(length)
        cgi = subprocess.Popen(["git", "http-backend"], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        feeder = threading.Thread(target=self._feed, args=(cgi.stdin, chunked, length),
                                  daemon=True)
        feeder.start()
        status, headers = "200 OK", []
        while True:
            line = cgi.stdout.readline().rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "status":
                status = value.strip()
            else:
                headers.append((name, value.strip()))
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            data = cgi.stdout.read1(65536)
            if not data:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")
        feeder.join()
        cgi.wait()

    def _feed(self, stdin, chunked: bool, length: int) -> None:
        try:
            if chunked:
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    stdin.write(self.rfile.read(size))
                    self.rfile.readline()
            else:
                while length > 0:
                    data = self.rfile.read(min(length, 65536))
                    if not data:
                        break
                    stdin.write(data)
                    length -= len(data)
        except BrokenPipeError:
            pass
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: "GitServer"


class GitServer:
    """
    A private git host on 127.0.0.1 (a port of its own), over HTTPS.

    @ivar seen: C{(method, path, Authorization, X-Capsule-Session)} of each
        request, in order.
    @ivar pushed_chunked: a push came with a chunked body.
    """

    def __init__(self, directory: Path, token: str) -> None:
        self.directory = Path(directory)
        self.root = self.directory / "git-host"
        self.root.mkdir(parents=True, exist_ok=True)
        self.authorization = "Basic " + base64.b64encode(
            f"x-access-token:{token}".encode()).decode()
        self.key, self.ca = self_signed(self.directory)
        self.seen: list[tuple] = []
        self.pushed_chunked = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> "GitServer":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca, self.key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def create(self, name: str, files: dict[str, str] | None = None) -> Path:
        """
        A bare repository C{name}.git (C{owner/repo}) holding one commit
        on C{main} of C{files}.
        """
        work = self.directory / f"work-{name.replace('/', '-')}"
        work.mkdir(parents=True)
        env = {**os.environ, **GIT_ENV}
        for path, text in (files or {"README.md": "a private repository\n"}).items():
            (work / path).write_text(text)
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                     ["git", "commit", "-q", "-m", "first"]):
            subprocess.run(argv, cwd=work, env=env, check=True)
        bare = self.root / f"{name}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], env=env,
                       check=True)
        subprocess.run(["git", "config", "http.receivepack", "true"], cwd=bare, env=env,
                       check=True)
        shutil.rmtree(work)
        return bare

    def log_of(self, name: str, ref: str = "main") -> list[str]:
        """
        The subjects of C{ref}'s commits in repository C{name}, newest first.
        """
        out = subprocess.run(["git", "--git-dir", str(self.root / f"{name}.git"), "log",
                              "--format=%s", ref], env={**os.environ, **GIT_ENV},
                             capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
