"""API keys and tenants, rate limits, queue quotas, idempotency (real Redis; no worker needed:
the jobs stay queued, which is what quotas and cancels are about)."""

import json
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, _redis_on_free_port
from tests.helpers import digit_png, submit

KEYS = {"acme": "acme-key-0123456789", "globex": "globex-key-9876543210"}


def sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def own_redis():
    """One redis-server for this module's tests (each flushes it)."""
    yield from _redis_on_free_port()


@pytest.fixture
def secured(own_redis, settings, tmp_path):
    """An app with two tenants' keys: acme inline, globex in a keys file with its own quota."""
    from redis import Redis

    Redis.from_url(own_redis.url).flushall()
    keys_file = tmp_path / "keys.json"
    entry = {"tenant": "globex", "sha256": sha(KEYS["globex"]), "max_unfinished_jobs": 2}
    keys_file.write_text(json.dumps({"keys": [entry]}))
    s = settings.model_copy(
        update={"redis_url": own_redis.url, "api_keys": f"acme:{sha(KEYS['acme'])}", "api_keys_file": str(keys_file)}
    )
    return s


def client_for(s):
    from service.main import create_app

    return TestClient(create_app(s))


def as_(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def post_job(api, tenant: str, index: int = 0, headers: dict | None = None, params: dict | None = None):
    image, _ = digit_png(index)
    return api.post(
        "/v1/jobs/saliency",
        files={"image": ("x.png", image, "image/png")},
        data={"model_id": "digits-cnn", "params": json.dumps(params or {})},
        headers={**as_(tenant), **(headers or {})},
    )


def test_keys_are_required_except_for_probes(secured):
    with client_for(secured) as api:
        r = api.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert api.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert api.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert api.get("/v1/models", headers={"Authorization": f"Basic {KEYS['acme']}"}).status_code == 401
        assert api.get("/v1/models", headers=as_("acme")).status_code == 200
        assert api.get("/v1/methods", headers={"X-API-Key": KEYS["globex"]}).status_code == 200
        assert api.get("/v1/jobs/0123456789abcdef").status_code == 401
        assert post_job(api, "acme", headers={"Authorization": "Bearer nope"}).status_code == 401
        # Probes and metrics stay open (readyz is 503 here: no worker, but not 401).
        assert api.get("/healthz").status_code == 200
        assert api.get("/readyz").status_code == 503
        assert api.get("/metrics").status_code == 200


def test_another_tenants_job_is_404_exactly_like_a_missing_one(secured):
    with client_for(secured) as api:
        r = post_job(api, "acme", 1)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        missing = "f" * 32
        for method, path in [
            ("GET", "/v1/jobs/{}"),
            ("GET", "/v1/jobs/{}/events"),
            ("GET", "/v1/jobs/{}/artifacts/0-heatmap.png"),
            ("DELETE", "/v1/jobs/{}"),
        ]:
            theirs = api.request(method, path.format(job_id), headers=as_("globex"))
            absent = api.request(method, path.format(missing), headers=as_("globex"))
            assert theirs.status_code == absent.status_code == 404
            assert theirs.json() == json.loads(absent.text.replace(missing, job_id))
        assert api.get(f"/v1/jobs/{job_id}", headers=as_("acme")).json()["status"] == "queued"
        # The same content by the other tenant is another job, with its own stored inputs.
        other = post_job(api, "globex", 1).json()
        assert other["id"] != job_id
        assert post_job(api, "acme", 1).json()["id"] == job_id  # same tenant: deduplicated
        from redis import Redis
        from rq.job import Job
        from rq.serializers import JSONSerializer

        conn = Redis.from_url(secured.redis_url)
        inputs = [
            Job.fetch(i, connection=conn, serializer=JSONSerializer).args[0]["inputs"] for i in (job_id, other["id"])
        ]
        assert inputs[0] != inputs[1] and all(conn.exists(f"inspector:input:{i[0]}") for i in inputs)


def test_idempotency_key_returns_the_same_job(secured):
    with client_for(secured) as api:
        first = post_job(api, "acme", 2, headers={"Idempotency-Key": "order-17"})
        assert first.status_code == 202
        job_id = first.json()["id"]
        assert api.delete(f"/v1/jobs/{job_id}", headers=as_("acme")).json()["status"] == "canceled"
        # A retried submit with the key gets that very job back, canceled, not a new run...
        again = post_job(api, "acme", 2, headers={"Idempotency-Key": "order-17"})
        assert again.json()["id"] == job_id and again.json()["status"] == "canceled"
        assert again.json()["deduplicated"] is True
        # ... while the same content without the key is run afresh under the same id.
        fresh = post_job(api, "acme", 2)
        assert fresh.json()["id"] == job_id and fresh.json()["status"] == "queued"
        # The key with a different request is refused; keys are per tenant.
        other = post_job(api, "acme", 3, headers={"Idempotency-Key": "order-17"})
        assert other.status_code == 422 and other.json()["error"]["type"] == "idempotency_key_reused"
        assert post_job(api, "globex", 3, headers={"Idempotency-Key": "order-17"}).status_code == 202
        bad = post_job(api, "acme", 3, headers={"Idempotency-Key": "x" * 300})
        assert bad.status_code == 422


def test_rate_limit_per_tenant_is_429_with_retry_after(secured):
    limited = secured.model_copy(update={"rate_limit_per_s": 0.5, "rate_limit_burst": 3})
    with client_for(limited) as api:
        codes = [post_job(api, "acme", i).status_code for i in range(4)]
        assert codes == [202, 202, 202, 429], codes
        r = post_job(api, "acme", 5)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 2
        assert post_job(api, "globex", 5).status_code == 202  # another tenant has its own bucket
        assert all(api.get("/v1/models", headers=as_("acme")).status_code == 200 for _ in range(10))  # reads
        time.sleep(int(r.headers["retry-after"]) + 0.05)  # as told: a token is back
        assert post_job(api, "acme", 6).status_code == 202


def test_queue_quota_counts_unfinished_jobs(secured):
    with client_for(secured) as api:
        a, b = post_job(api, "globex", 0).json(), post_job(api, "globex", 1).json()
        r = post_job(api, "globex", 2)
        assert r.status_code == 429 and r.json()["error"]["type"] == "quota_exceeded", r.text
        assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["details"]["limit"] == 2
        assert post_job(api, "globex", 0).json()["id"] == a["id"]  # an existing job is never refused
        assert post_job(api, "acme", 2).status_code == 202  # acme has no quota
        api.delete(f"/v1/jobs/{b['id']}", headers=as_("globex"))  # a canceled job frees its slot
        assert post_job(api, "globex", 2).status_code == 202


def test_keyring_parses_hashes_rotates_and_fails_closed(settings, tmp_path):
    from service.auth import KeyRing

    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"tenant": "t1", "sha256": sha("k1"), "rate_limit_per_s": 1}]}))
    inline = f"t0:{sha('k0')}, t2:{sha('k2')}"
    ring = KeyRing(settings.model_copy(update={"api_keys": inline, "api_keys_file": str(path)}), recheck_s=0)
    assert ring.lookup("k0").name == "t0" and ring.lookup("k2").name == "t2"
    assert ring.lookup("k1").rate_limit_per_s == 1 and ring.lookup("k1x") is None
    time.sleep(0.01)
    path.write_text(json.dumps({"keys": [{"tenant": "t3", "sha256": sha("k3")}]}))
    assert ring.lookup("k1") is None and ring.lookup("k3").name == "t3"  # rotated, no restart
    path.write_text("{broken")
    assert ring.lookup("k3").name == "t3"  # a broken edit keeps the last good keys
    with pytest.raises(ValueError):
        KeyRing(settings.model_copy(update={"api_keys": "no-colon-here"}))
    with pytest.raises(ValueError):
        KeyRing(settings.model_copy(update={"api_keys_file": str(path)}))  # unreadable at start: refuse
    assert not KeyRing(settings).enabled  # nothing configured: auth off


def test_new_key_command_prints_a_key_and_its_hash():
    out = subprocess.run([sys.executable, "-m", "service.auth", "new-key", "--tenant", "acme"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    key = out.splitlines()[0].split()[-1]
    assert out.splitlines()[1].split()[-1] == f"acme:{sha(key)}" and len(key) >= 40


def test_auth_off_by_default(api):
    """No keys configured (make run): open, one implicit tenant."""
    image, _ = digit_png(0)
    r = submit(api, "saliency", [image], "digits-cnn", {"aggregation": "sum"})
    assert r.status_code in (200, 202)
    assert api.get(f"/v1/jobs/{r.json()['id']}").status_code == 200
