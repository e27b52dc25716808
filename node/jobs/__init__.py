"""Jobs: stable studies routed into jobs on durable queues (Huey on SQLite or Redis), run by
worker processes with heartbeats, retried with backoff, dead-lettered after the last attempt."""

from node.jobs.queue import Queues
from node.jobs.reaper import Reaper
from node.jobs.runner import JobFailed, Runner
from node.jobs.state import Job, JobState, JobStore, job_id
from node.jobs.worker import WorkerPool, run_worker

__all__ = [
    "Job",
    "JobFailed",
    "JobState",
    "JobStore",
    "Queues",
    "Reaper",
    "Runner",
    "WorkerPool",
    "job_id",
    "run_worker",
]
