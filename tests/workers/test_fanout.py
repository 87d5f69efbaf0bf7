"""Chunk sharing through a real Redis: every chunk once, lost leases requeued, resume."""

import threading

from redis import Redis

from workers.fanout import ChunkBoard, work_through


def board(redis_server, job="job-1", n=10, lease_s=1.0):
    return ChunkBoard(Redis.from_url(redis_server.url), job, n, lease_s=lease_s, ttl_s=60)


def test_two_workers_share_chunks_each_computed_once(redis_server):
    owner, helper = board(redis_server, "share"), board(redis_server, "share")
    assert owner.start("plan-a") == 10
    computed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def compute(name):
        def run(i, renew):
            renew()
            with lock:
                computed.append((name, i))
            threading.Event().wait(0.02)
            return {"square": i * i}

        return run

    t = threading.Thread(target=work_through, args=(helper, compute("helper")), kwargs={"wait_for_others": False})
    t.start()
    work_through(owner, compute("owner"))
    t.join()
    assert sorted(i for _, i in computed) == list(range(10))
    assert {name for name, _ in computed} == {"owner", "helper"}
    assert [r["square"] for r in owner.results()] == [i * i for i in range(10)]


def test_chunk_of_a_dead_worker_is_requeued(redis_server):
    b = board(redis_server, "lost", n=3, lease_s=1)
    b.start("p")
    lost = b.claim()  # claimed by a worker that then dies: its lease lapses after 1 s
    done = []
    work_through(b, lambda i, renew: done.append(i) or {"i": i}, poll_s=0.05)
    assert sorted(done) == [0, 1, 2] and lost in done


def test_resume_recomputes_only_missing_chunks_and_new_plan_starts_over(redis_server):
    b = board(redis_server, "resume", n=4)
    b.start("p1")
    b.finish(b.claim(), {"x": 1})
    b.finish(b.claim(), {"x": 1})
    assert b.start("p1") == 2  # a resubmitted job: two chunks left
    assert b.start("p2") == 4  # a different plan: results discarded
