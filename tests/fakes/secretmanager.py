"""A fake Secret Manager API v1 (AccessSecretVersion) over real gRPC, built like the Cloud Run
one."""

from __future__ import annotations

import google_crc32c
import grpc
from google.cloud import secretmanager_v1 as sm

from tests.fakes.grpcfake import FakeGrpcServer


class FakeSecretManager(FakeGrpcServer):
    def __init__(self) -> None:
        super().__init__()
        # "projects/P/secrets/S" -> versions 1..n
        self.secrets: dict[str, list[bytes]] = {}
        # Answer with a checksum that does not match (a corrupted payload).
        self.corrupt = False
        self.add_service(
            "google.cloud.secretmanager.v1.SecretManagerService",
            {
                "AccessSecretVersion": (
                    self._access,
                    sm.AccessSecretVersionRequest.deserialize,
                    sm.AccessSecretVersionResponse.serialize,
                )
            },
        )

    def add(self, secret: str, value: str | bytes) -> str:
        """Add a version; returns its full name."""
        data = value.encode() if isinstance(value, str) else value
        with self.lock:
            versions = self.secrets.setdefault(secret, [])
            versions.append(data)
            return f"{secret}/versions/{len(versions)}"

    def _access(
        self, req: sm.AccessSecretVersionRequest, context: grpc.ServicerContext
    ) -> sm.AccessSecretVersionResponse:
        secret, _, version = req.name.partition("/versions/")
        with self.lock:
            versions = self.secrets.get(secret)
            if not versions:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Secret [{secret}] not found.")
            number = len(versions) if version == "latest" else int(version or 0)
            if not 1 <= number <= len(versions):
                context.abort(grpc.StatusCode.NOT_FOUND, f"Secret Version [{req.name}] not found.")
            data = versions[number - 1]
        crc = google_crc32c.value(data) ^ (1 if self.corrupt else 0)
        return sm.AccessSecretVersionResponse(
            name=f"{secret}/versions/{number}",
            payload=sm.SecretPayload(data=data, data_crc32c=crc),
        )
