"""``/v1/datasets`` through the API (real Redis): uploads, listing, tenants, quotas, bad zips,
and a data set that a queued job uses (409); ``schemas.datasets``' zip check and class
mapping directly."""

from __future__ import annotations

import json
import zipfile

import pytest
from fastapi.testclient import TestClient

from schemas.datasets import check_dataset_zip, class_index
from schemas.errors import BadParams
from service.auth import hash_key
from tests.helpers import noise_images, upload_dataset, zip_of
from tests.service.test_training_set_upload import BAD, _bomb

IMAGES = noise_images(6)
FOLDER_ZIP = zip_of({f"set/{c}/{i}.png": IMAGES[3 * k + i] for k, c in enumerate(["cat", "dog"]) for i in range(3)})


def test_folder_and_flat_zips_are_listed_in_order():
    folder = check_dataset_zip(FOLDER_ZIP, 100, 1 << 30)
    assert folder.layout == "imagefolder" and folder.classes == ["cat", "dog"]
    assert folder.members == [f"set/{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert folder.class_counts() == {"cat": 3, "dog": 3}
    labels_csv = b"file,label\nb.png,7\nsub/c.png,2\n"
    flat = check_dataset_zip(zip_of({"b.png": IMAGES[0], "a.png": IMAGES[1], "sub/c.png": IMAGES[2],
                                     "labels.csv": labels_csv}), 100, 1 << 30)  # fmt: skip
    assert flat.layout == "flat" and flat.members == ["a.png", "b.png", "sub/c.png"]
    assert flat.labels == [None, "7", "2"] and flat.classes == ["2", "7"]
    assert flat.label_indices([f"class-{i}" for i in range(10)]) == [-1, 7, 2]  # integers are indices
    bare = check_dataset_zip(zip_of({"x.png": IMAGES[0], "y.jpg": IMAGES[1]}), 100, 1 << 30)
    assert bare.layout == "flat" and bare.labels == [None, None] and bare.classes == []


@pytest.mark.parametrize(
    "members, message",
    [
        ({"cat/a.png": IMAGES[0], "b.png": IMAGES[1]}, "mixes class folders"),
        ({"a.png": IMAGES[0], "labels.csv": b"a.png,1\nzz.png,2\n"}, "not images of the zip"),
        ({"a.png": IMAGES[0], "labels.csv": b"a.png\n"}, "is not 'file,label'"),
    ],
)
def test_zip_check_refuses(members, message):
    with pytest.raises(BadParams, match=message):
        check_dataset_zip(zip_of(members), 100, 1 << 30)


def test_class_mapping_rules():
    labels = ["cat", "dog", "bird"]
    assert class_index(["dog", "cat"], labels) == {"dog": 1, "cat": 0}  # by name
    assert class_index(["2", "0"], labels) == {"2": 2, "0": 0}  # as indices
    assert class_index(["b", "a", "c"], labels) == {"a": 0, "b": 1, "c": 2}  # by count, sorted
    assert class_index(["x", "y"], labels) is None
    assert class_index(["5"], labels) is None


def test_upload_list_read_delete(api):
    r = upload_dataset(api, FOLDER_ZIP, name="pets")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"].startswith("ds_") and r.headers["Location"] == f"/v1/datasets/{info['id']}"
    assert (info["name"], info["images"], info["classes"]) == ("pets", 6, ["cat", "dog"])
    assert info["bytes"] == len(FOLDER_ZIP) and info["layout"] == "imagefolder"
    # the same bytes again (as multipart this time): the same data set
    again = api.post("/v1/datasets", files={"file": ("pets.zip", FOLDER_ZIP, "application/zip")})
    assert again.status_code == 200 and again.json()["id"] == info["id"]
    listed = api.get("/v1/datasets").json()
    ids = [d["id"] for d in listed["datasets"]]
    assert info["id"] in ids and {"model:digits-cnn/train", "model:digits-cnn/test"} <= set(ids)
    assert listed["bytes_used"] >= len(FOLDER_ZIP)
    detail = api.get(f"/v1/datasets/{info['id']}").json()
    assert detail["class_counts"] == {"cat": 3, "dog": 3} and detail["jobs"] == []
    digits = api.get("/v1/datasets/model:digits-cnn/test").json()
    assert digits["images"] == 360 and digits["read_only"] and digits["model_id"] == "digits-cnn"
    assert api.delete("/v1/datasets/model:digits-cnn/test").status_code == 422
    assert api.delete(f"/v1/datasets/{info['id']}").status_code == 204
    gone = api.get(f"/v1/datasets/{info['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "unknown_dataset"


@pytest.mark.parametrize("case", [c for c in BAD if c not in ("no class folders", "labels")])
def test_bad_zips_get_the_training_set_statuses(settings, case):
    data, status, message = BAD[case]
    from service.main import create_app

    app = create_app(settings.model_copy(update={"max_dataset_images": settings.max_training_set_images}))
    with TestClient(app) as c:
        r = upload_dataset(c, data)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == ("bad_params" if status == 422 else "payload_too_large")


def test_bombs_quotas_and_empty_bodies(settings, own_redis):
    """Quotas count the tenant's data sets, so this runs on a Redis of its own (other tests
    leave the anonymous tenant's data sets in the session's)."""
    from service.main import create_app

    small = settings.model_copy(
        update={
            "redis_url": own_redis.url,
            "max_dataset_uncompressed_bytes": 256 * 1024 * 1024,
            "max_datasets": 2,
            "max_dataset_bytes": 2_000_000,
        }
    )
    with TestClient(create_app(small)) as c:
        r = upload_dataset(c, _bomb())
        assert r.status_code == 413 and "uncompressed" in r.json()["error"]["message"]
        assert upload_dataset(c, b"").status_code == 422
        r = upload_dataset(c, b"\0" * 2_000_001)  # over the tenant's whole quota: refused while it arrives
        assert r.status_code == 413, r.text
        r = c.post("/v1/datasets", content=b"x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        sizes = []
        for k in range(3):
            archive = zip_of({f"{k}.png": IMAGES[k]}, zipfile.ZIP_STORED)
            r = upload_dataset(c, archive)
            sizes.append((r.status_code, len(archive)))
        assert [s for s, _ in sizes] == [201, 201, 429], sizes
        assert "Retry-After" in r.headers and r.json()["error"]["type"] == "quota_exceeded"
        for d in c.get("/v1/datasets").json()["datasets"]:
            if not d["read_only"]:
                assert c.delete(f"/v1/datasets/{d['id']}").status_code == 204


def test_tenants_see_only_their_data_sets(settings):
    from service.main import create_app

    keys = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
    entries = " ".join(f"{t}:{hash_key(k)}" for t, k in keys.items())
    with TestClient(create_app(settings.model_copy(update={"api_keys": entries}))) as c:
        acme, globex = ({"X-API-Key": keys[t]} for t in ("acme", "globex"))
        own = upload_dataset(c, FOLDER_ZIP, headers=acme).json()
        theirs = upload_dataset(c, FOLDER_ZIP, headers=globex).json()
        assert own["id"] != theirs["id"] and own["sha256"] == theirs["sha256"]  # one zip, two data sets
        r = c.get(f"/v1/datasets/{own['id']}", headers=globex)
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_dataset"
        assert c.delete(f"/v1/datasets/{own['id']}", headers=globex).status_code == 404
        assert own["id"] not in [d["id"] for d in c.get("/v1/datasets", headers=globex).json()["datasets"]]
        params = {"dataset": own["id"]}
        r = c.post("/v1/jobs/attribution_batch", headers=globex, json={"model_id": "resnet18-random", "params": params})
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_dataset", r.text
        assert c.delete(f"/v1/datasets/{own['id']}", headers=acme).status_code == 204
        # the zip stays while the other tenant's data set is stored in it
        assert c.get(f"/v1/datasets/{theirs['id']}", headers=globex).json()["images"] == 6
        assert c.delete(f"/v1/datasets/{theirs['id']}", headers=globex).status_code == 204
        assert not (settings.data_dir / "datasets" / f"{own['sha256']}.zip").exists()


def test_job_checks_and_delete_while_queued(settings, own_redis):
    """No worker listens on this Redis: a submitted job stays queued, and its data set
    cannot be deleted until it is canceled."""
    from service.main import create_app

    with TestClient(create_app(settings.model_copy(update={"redis_url": own_redis.url}))) as c:
        ds = upload_dataset(c, FOLDER_ZIP).json()["id"]

        def submit(kind: str, params: dict, model: str = "resnet18-random"):
            return c.post(f"/v1/jobs/{kind}", json={"model_id": model, "params": params})

        r = submit("attribution_batch", {"dataset": ds})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        busy = c.delete(f"/v1/datasets/{ds}")
        assert busy.status_code == 409 and busy.json()["error"]["type"] == "dataset_in_use"
        assert busy.json()["error"]["details"]["jobs"] == [job]
        assert c.get(f"/v1/datasets/{ds}").json()["jobs"] == [job]
        # as a training set, two classes cannot map onto digits-cnn's ten labels
        image = [("image", ("a.png", IMAGES[0], "image/png"))]
        bad = c.post("/v1/jobs/influence", data={"model_id": "digits-cnn", "params": json.dumps({"training_set": ds})},
                     files=image)  # fmt: skip
        assert bad.status_code == 422 and "neither" in bad.json()["error"]["message"]
        assert submit("compare", {}).status_code == 422  # neither images nor a data set
        both = c.post("/v1/jobs/compare", data={"model_id": "resnet18-random", "params": json.dumps({"dataset": ds})},
                      files=image)  # fmt: skip
        assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
        assert submit("u_sweep", {"dataset": "model:test"}).status_code == 404  # resnet18-random has none
        assert submit("u_sweep", {"dataset": "model:digits-cnn/test"}).status_code == 422  # another model's
        assert submit("attribution_batch", {"dataset": "ds_" + "0" * 32}).status_code == 404
        assert c.delete(f"/v1/jobs/{job}").json()["status"] == "canceled"
        assert c.delete(f"/v1/datasets/{ds}").status_code == 204
