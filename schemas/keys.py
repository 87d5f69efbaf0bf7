"""Redis key names and queue names, shared by the API and the workers.

Storage choice: inputs (normalised RGB images, ``schemas.stored_images``) and artifacts live
in Redis beside the jobs, so every worker and API replica on any host reads them without a
shared disk. They expire with the
job's result TTL. Limit: Redis holds them in memory, so uploads are capped
(``max_upload_bytes``) and large outputs stay in the low megabytes per job; a deployment that
needs gigabytes of artifacts would move them to object storage behind the same two functions.
"""

from __future__ import annotations

PREFIX = "inspector"
QUEUES = ("high", "default", "low")
RUN_JOB_FUNC = "workers.tasks.run_job"
HELP_JOB_FUNC = "workers.tasks.help_job"
JOB_ENDED_FUNC = "workers.webhooks.job_ended_task"
ON_SUCCESS_FUNC = "workers.webhooks.on_success"
ON_FAILURE_FUNC = "workers.webhooks.on_failure"


def input_key(sha256: str) -> str:
    return f"{PREFIX}:input:{sha256}"


def artifact_key(job_id: str, name: str) -> str:
    return f"{PREFIX}:artifact:{job_id}:{name}"


def reply_key(job_id: str) -> str:
    """List a worker pushes a synchronous (predict) reply onto; the API BLPOPs it."""
    return f"{PREFIX}:reply:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:cancel:{job_id}"


def submit_lock_key(job_id: str) -> str:
    return f"{PREFIX}:submit-lock:{job_id}"


def predict_queue_key(model_id: str) -> str:
    """List of predict requests for one model; workers drain it in batches (workers.batching)."""
    return f"{PREFIX}:predict:{model_id}"


def reap_lock_key(queue: str) -> str:
    """Held (for seconds) while one process reaps a queue's abandoned jobs: RQ's cleanup is not
    atomic, and two at once would both rerun a job. Our own key, not RQ's maintenance lock
    (``rq:clean_registries:<queue>``, taken for 899 s: a worker killed while holding it would
    stop every reaper for 15 minutes); RQ's periodic maintenance takes this one too
    (``workers.worker.InspectorWorker.clean_registries``)."""
    return f"{PREFIX}:reap-lock:{queue}"


REAP_LOCK_S = 10
"""Longest a reap lock is held: what a process killed while reaping delays the next reap by."""


def callbacks_key(job_id: str) -> str:
    """Set of callback URLs to notify when the job ends."""
    return f"{PREFIX}:callbacks:{job_id}"


def ended_key(job_id: str) -> str:
    """The job's terminal webhook event (JSON), written once when it ends."""
    return f"{PREFIX}:ended:{job_id}"


def idempotency_key(tenant: str, key: str) -> str:
    return f"{PREFIX}:idempotency:{tenant}:{key}"


def rate_key(tenant: str) -> str:
    return f"{PREFIX}:rate:{tenant}"


def unfinished_key(tenant: str) -> str:
    """Sorted set of the tenant's job ids not known to have ended (its queue quota)."""
    return f"{PREFIX}:unfinished:{tenant}"


def warm_key(worker_name: str) -> str:
    """JSON of what a worker has warm (``schemas.jobs.WarmState``); expires with its heartbeat."""
    return f"{PREFIX}:warm:{worker_name}"


def dataset_key(dataset_id: str) -> str:
    """JSON ``schemas.datasets.StoredDataset`` of an uploaded data set (metadata only)."""
    return f"{PREFIX}:dataset:{dataset_id}"


def tenant_datasets_key(tenant: str) -> str:
    """Set of the tenant's data set ids."""
    return f"{PREFIX}:datasets:{tenant}"


def dataset_jobs_key(dataset_id: str) -> str:
    """Set of ids of jobs submitted with the data set (pruned of ended ones on delete)."""
    return f"{PREFIX}:dataset-jobs:{dataset_id}"


def dataset_blob_key(sha256: str) -> str:
    """Set of the data set ids stored in the zip of this sha256 (the file goes with the last)."""
    return f"{PREFIX}:dataset-blob:{sha256}"


def dataset_lock_key(tenant: str) -> str:
    """Held while a tenant's data sets change or a job takes a reference to one."""
    return f"{PREFIX}:dataset-lock:{tenant}"


STATS_KEY = f"{PREFIX}:stats"
"""Hash of counters workers increment: ``jobs:<kind>:<status>``, ``seconds:<kind>``."""
