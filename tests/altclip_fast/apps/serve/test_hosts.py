"""The Host check against DNS rebinding: ``is_allowed`` alone, then the application with and without a
key (starlette's TestClient on 127.0.0.1)."""

from __future__ import annotations

import pytest

for _name in ("transformers", "starlette", "httpx"):
    pytest.importorskip(_name)

from altclip_fast.apps.serve.hosts import host_name, is_allowed  # noqa: E402
from tests.altclip_fast.apps.serve.helpers import AUTH, KEY, embed  # noqa: E402


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "127.0.0.1", "localhost:8000", "LOCALHOST.", "[::1]:8000",
                                  "[::1]", "10.1.2.3:80", "", "api.internal:8000"])
def test_addresses_localhost_and_allowed_names_pass(host):
    assert is_allowed(host, ("api.internal",))


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "api.internal.evil.example", "[::1", "x:y:z"])
def test_other_names_are_foreign(host):
    assert not is_allowed(host, ("api.internal",))


def test_host_name_strips_the_port_and_the_final_dot():
    assert [host_name(h) for h in ("Api.Internal.:8000", "[::1]:80", "1.2.3.4")] == ["api.internal", "[::1]", "1.2.3.4"]
    assert is_allowed("anything.example", ("*",))


def test_without_a_key_a_foreign_host_is_421_on_every_route(app_client):
    with app_client() as client:
        for method, url in (("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/health")):
            r = client.request(method, url, headers={"Host": "evil.example:8000"},
                               json={"model": "altclip", "input": ["x"]} if method == "POST" else None)
            assert r.status_code == 421, (url, r.text)
            error = r.json()["error"]
            assert error["code"] == 421 and error["type"] == "invalid_request_error"
            assert "--allow-host" in error["message"]
        assert embed(client, ["x"]).status_code == 200  # Host: 127.0.0.1
        assert client.get("/v1/models", headers={"Host": "localhost:8000"}).status_code == 200
        assert 'altclip_failures_total{reason="foreign_host"} 3.0' in client.get("/metrics").text


def test_allow_host_names_more_and_a_key_replaces_the_check(app_client):
    with app_client(allow_hosts=("embed.internal",)) as client:
        assert client.get("/v1/models", headers={"Host": "embed.internal:8000"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "evil.example"}).status_code == 421
    with app_client(headers=AUTH, api_key=KEY) as client:  # the key is the protection: any Host with it
        assert client.get("/v1/models", headers={"Host": "embed.example"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "evil.example", "Authorization": ""}).status_code == 401
