"""The HTTP API (FastAPI). Never imports torch, torchvision or captum: it validates, stores
inputs in Redis, enqueues RQ jobs by dotted path and reads results back."""
