"""Google's side of ID tokens, on loopback: a signing key with its certificate, the certificate
endpoint (https://www.googleapis.com/oauth2/v1/certs) and the metadata server's identity
endpoint that code on Cloud Run asks for its service account's ID token. Tokens are real RS256
JWTs, made with google-auth's own signer."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt


class SigningKey:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(private, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.signer = crypt.RSASigner.from_string(pem, key_id=kid)

    def token(self, audience: str, email: str, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": "https://accounts.google.com",
            "aud": audience,
            "azp": "1234567890",
            "sub": "1234567890",
            "email": email,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        payload.update(claims)
        return jwt.encode(self.signer, payload).decode()


class _Server:
    def __init__(self) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                status, headers, body = outer.answer(self)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, request: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CertServer(_Server):
    """{key id: certificate}, with Cache-Control: max-age as Google sends it."""

    def __init__(self, *keys: SigningKey) -> None:
        self.certs = {k.kid: k.cert_pem for k in keys}
        super().__init__()
        self.url = f"http://{self.host}/oauth2/v1/certs"

    def answer(self, request: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        headers = {
            "content-type": "application/json",
            "cache-control": "public, max-age=19800, must-revalidate",
        }
        return 200, headers, json.dumps(self.certs).encode()


class MetadataServer(_Server):
    """The metadata server of a Cloud Run task running as `email`: clients find it through
    GCE_METADATA_HOST / GCE_METADATA_IP."""

    def __init__(self, key: SigningKey, email: str) -> None:
        self.key, self.email = key, email
        self.audiences: list[str] = []
        super().__init__()

    def answer(self, request: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        flavor = {"Metadata-Flavor": "Google", "content-type": "application/text"}
        if request.headers.get("Metadata-Flavor") != "Google":
            return 403, flavor, b"Missing Metadata-Flavor:Google header."
        url = urlparse(request.path)
        if url.path in ("", "/"):
            return 200, flavor, b"computeMetadata/\n"
        if url.path.rstrip("/").endswith("/service-accounts/default"):
            info = {"email": self.email, "aliases": ["default"], "scopes": []}
            body = json.dumps(info).encode()
            return 200, {**flavor, "content-type": "application/json"}, body
        if url.path.endswith("/service-accounts/default/email"):
            return 200, flavor, self.email.encode()
        if url.path.endswith("/service-accounts/default/identity"):
            audience = parse_qs(url.query)["audience"][0]
            self.audiences.append(audience)
            return 200, flavor, self.key.token(audience, self.email).encode()
        return 404, flavor, b"not found"
