import io

import numpy as np
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_and_saliency(client, chelsea):
    r = client.post("/v1/models/efficientnet-lite0/predict", files={"image": ("cat.png", png(chelsea), "image/png")})
    print(r.json())
    assert r.status_code == 200
    r = client.post(
        "/v1/jobs/saliency?wait=60",
        files={"image": ("cat.png", png(chelsea), "image/png")},
        data={"model_id": "digits-cnn"},
    )
    print(r.json())
    assert r.status_code == 200
