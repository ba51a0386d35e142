"""The SDK's typed surface: every resource group declared on Client is attached, answers are checked."""

from __future__ import annotations

import json
import typing
from typing import Any

import httpx
import pytest

import hackboot.sdk.catalog
import hackboot.sdk.compute
import hackboot.sdk.events
import hackboot.sdk.functions
import hackboot.sdk.identity
import hackboot.sdk.images
import hackboot.sdk.loadbalancers
import hackboot.sdk.network
import hackboot.sdk.s3
import hackboot.sdk.volumes
from hackboot.sdk.client import ApiError, Client, Resource, as_object, as_objects

SDK_MODULES = [hackboot.sdk.catalog, hackboot.sdk.compute, hackboot.sdk.events, hackboot.sdk.functions,
               hackboot.sdk.identity, hackboot.sdk.images, hackboot.sdk.loadbalancers, hackboot.sdk.network,
               hackboot.sdk.s3, hackboot.sdk.volumes]


def declared_groups() -> dict[str, type[Resource]]:
    """Client's annotated attributes whose type is a resource group (resolved in the SDK modules)."""
    namespace: dict[str, Any] = {}
    for module in SDK_MODULES:
        namespace.update(vars(module))
    hints = typing.get_type_hints(Client, localns=namespace)
    return {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, Resource)}


def client_answering(handler: typing.Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client("http://api.test", "token", transport=httpx.MockTransport(handler))


def test_every_declared_group_is_attached_with_its_declared_class() -> None:
    groups = declared_groups()
    assert {"instances", "volumes", "images", "projects", "regions", "webhooks", "buckets"} <= set(groups)
    with client_answering(lambda request: httpx.Response(500)) as client:
        for name, cls in groups.items():
            assert type(getattr(client, name)) is cls, name


def test_every_attached_group_is_declared() -> None:
    """A group attached without a declaration would be invisible to type checkers again."""
    with client_answering(lambda request: httpx.Response(500)) as client:
        attached = {name for name, value in vars(client).items() if isinstance(value, Resource)}
    assert attached == set(declared_groups())


def test_as_object_and_as_objects_accept_the_documented_shapes() -> None:
    assert as_object({"id": "i-1"}) == {"id": "i-1"}
    assert as_objects([{"id": "i-1"}, {"id": "i-2"}]) == [{"id": "i-1"}, {"id": "i-2"}]
    assert as_objects([]) == []


@pytest.mark.parametrize("value", [None, "text", [], [{"id": "i-1"}], 3])
def test_as_object_refuses_other_shapes_with_an_api_error(value: object) -> None:
    with pytest.raises(ApiError) as err:
        as_object(value)
    assert (err.value.status, err.value.code) == (0, "unexpected_response")


@pytest.mark.parametrize("value", [None, "text", {"items": []}, [{"id": "i-1"}, "i-2"]])
def test_as_objects_refuses_other_shapes_with_an_api_error(value: object) -> None:
    with pytest.raises(ApiError) as err:
        as_objects(value)
    assert (err.value.status, err.value.code) == (0, "unexpected_response")


def test_a_resource_that_is_not_an_object_is_an_api_error_not_a_type_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=["not", "an", "instance"])

    with client_answering(handler) as client, pytest.raises(ApiError) as err:
        client.instances.get("i-1")
    assert err.value.code == "unexpected_response"


def test_list_follows_every_page_and_leaves_out_unset_filters() -> None:
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        query = dict(request.url.params)
        seen.append(query)
        if "cursor" not in query:
            return httpx.Response(200, json={"items": [{"id": "rgn-a"}], "next_cursor": "c1"})
        return httpx.Response(200, json={"items": [{"id": "rgn-b"}], "next_cursor": None})

    with client_answering(handler) as client:
        regions = client.regions.list(status="operational")
    assert [r["id"] for r in regions] == ["rgn-a", "rgn-b"]
    assert seen[0] == {"status": "operational", "limit": "500"}
    assert seen[1] == {"status": "operational", "limit": "500", "cursor": "c1"}


def test_a_204_answer_is_none_and_a_json_body_is_decoded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, content=json.dumps({"id": "img-1"}), headers={"content-type": "application/json"})

    with client_answering(handler) as client:
        assert client.images.delete("img-1") is None
        assert client.images.get("img-1") == {"id": "img-1"}
