"""SDK: S3 credentials, bucket usage and the project's public-access block."""

from __future__ import annotations

from hackboot.sdk.client import Client, Collection, JSONObject, as_object


class S3Credentials(Collection):
    path = "/v1/s3/credentials"

    def create(self, name: str = "s3", *, read_only: bool = False,
               buckets: list[str] | None = None) -> JSONObject:
        return as_object(self.c.post(self.path, {"name": name, "read_only": read_only, "buckets": buckets}))

    def revoke(self, credential_id: str) -> JSONObject:
        return as_object(self.c.delete(f"{self.path}/{credential_id}"))


class Buckets(Collection):
    path = "/v1/buckets"

    def public_access_block(self) -> JSONObject:
        return as_object(self.c.get("/v1/s3/public-access-block"))

    def set_public_access_block(self, block: bool) -> JSONObject:
        return as_object(self.c.put("/v1/s3/public-access-block", {"block_public_access": block}))


def attach(client: Client) -> None:
    client.s3_credentials = S3Credentials(client)
    client.buckets = Buckets(client)
