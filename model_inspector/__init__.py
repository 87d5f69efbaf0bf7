"""Python client of the Model Inspector API (``pip install model-inspector``, no extras).

    from model_inspector import Client

    c = Client("http://127.0.0.1:8000", api_key=None)
    c.models()
    c.predict(["cat.png", pil_image, numpy_array], model="efficientnet-lite0", top_k=3)
    ds = c.datasets.upload("photos/")                    # a folder is zipped here
    job = c.submit("attribution_batch", model="efficientnet-lite0", dataset=ds.id,
                   params={"method": "saliency"})
    job.wait(timeout=600, progress=True)                 # SSE, polling as the fallback
    maps = job.array("maps.npy")

Errors: :mod:`model_inspector.errors` (one tree mirroring the API's error types). 429 and
503 answers are retried with backoff, honouring ``Retry-After``; submissions carry an
Idempotency-Key so a retried submit never makes a second job.
"""

from model_inspector import errors
from model_inspector._core import RetryPolicy, Update
from model_inspector.aio import AsyncClient, AsyncJob
from model_inspector.client import Client, Job

__all__ = ["AsyncClient", "AsyncJob", "Client", "Job", "RetryPolicy", "Update", "errors"]
