"""CORS (``--cors-allow-origin``): clip-retrieval's web front, served from another origin, calls the search
routes from a browser. Without the option no CORS header is ever sent; with it, preflights are answered
before the key and Host checks, and every answer (an error included) carries the headers."""

from __future__ import annotations

from tests.altclip_fast.apps.serve.helpers import AUTH, KEY

FRONT = "http://127.0.0.1:3005"
PREFLIGHT = {"Origin": FRONT, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type"}
ALLOW = "access-control-allow-origin"


def test_without_the_option_there_are_no_cors_headers(knn_client):
    with knn_client() as client:
        reply = client.get("/indices-list", headers={"Origin": FRONT})
        preflight = client.options("/knn-service", headers=PREFLIGHT)
    assert reply.status_code == 200 and ALLOW not in reply.headers
    assert preflight.status_code == 405 and ALLOW not in preflight.headers


def test_the_fronts_requests_get_cors_headers_for_its_origin(knn_client):
    with knn_client(cors_allow_origins=(FRONT,)) as client:
        preflight = client.options("/knn-service", headers=PREFLIGHT)
        listed = client.get("/indices-list", headers={"Origin": FRONT})
        # the front posts JSON as text/plain (a "simple" request: no preflight)
        found = client.post("/knn-service", headers={"Origin": FRONT, "Content-Type": "text/plain;charset=UTF-8"},
                            content=b'{"embedding_input": [1,1,1,1,1,1,1,1,1,1,1,1], "num_images": 2}')
        other = client.options("/knn-service", headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert preflight.status_code == 200 and preflight.headers[ALLOW] == FRONT
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert listed.headers[ALLOW] == FRONT and listed.json() == ["coll"]
    assert found.status_code == 200 and found.headers[ALLOW] == FRONT and len(found.json()) == 2
    # which search answered is readable by the page (browsers hide headers not exposed)
    assert found.headers["x-altclip-search"] == "exact"
    assert "x-altclip-search" in found.headers["access-control-expose-headers"].lower()
    assert other.status_code == 400 and ALLOW not in other.headers


def test_any_origin_with_a_star(knn_client):
    with knn_client(cors_allow_origins=("*",)) as client:
        preflight = client.options("/v1/search", headers={**PREFLIGHT, "Origin": "http://anywhere.example:8080"})
        reply = client.get("/indices-list", headers={"Origin": "http://anywhere.example:8080"})
    assert preflight.status_code == 200 and reply.headers[ALLOW] == "*"


def test_preflights_pass_the_key_and_host_checks_and_errors_carry_the_headers(knn_client):
    with knn_client(cors_allow_origins=(FRONT,), api_key=KEY) as client:
        preflight = client.options("/knn-service", headers={**PREFLIGHT,
                                                            "Access-Control-Request-Headers": "authorization"})
        refused = client.get("/indices-list", headers={"Origin": FRONT})
        allowed = client.get("/indices-list", headers={"Origin": FRONT, **AUTH})
    assert preflight.status_code == 200 and "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 401 and refused.headers[ALLOW] == FRONT  # the page can read why
    assert allowed.status_code == 200 and allowed.headers[ALLOW] == FRONT
    with knn_client(cors_allow_origins=(FRONT,)) as client:
        foreign = {"Host": "rebound.example"}
        preflight = client.options("/knn-service", headers={**PREFLIGHT, **foreign})
        refused = client.get("/indices-list", headers={"Origin": FRONT, **foreign})
    assert preflight.status_code == 200  # headers only: nothing is searched or answered
    assert refused.status_code == 421 and refused.headers[ALLOW] == FRONT


def test_the_app_state_reads_through_the_cors_layer(served_app):
    app = served_app(cors_allow_origins=("*",))
    assert app.state is not None and app.state.metrics is not None  # the server's connection metrics use it
