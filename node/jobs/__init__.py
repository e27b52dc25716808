"""Jobs: stable studies routed into jobs on durable queues (Huey on SQLite or Redis), run by
worker processes with heartbeats, retried with backoff, dead-lettered after the last attempt."""

from node.jobs.queue import QUEUES, Queues
from node.jobs.runner import JobFailed, Runner
from node.jobs.scheduler import Scheduler
from node.jobs.state import Job, JobState, JobStore, job_id
from node.jobs.worker import WorkerPool, run_worker

__all__ = [
    "QUEUES",
    "Job",
    "JobFailed",
    "JobState",
    "JobStore",
    "Queues",
    "Runner",
    "Scheduler",
    "WorkerPool",
    "job_id",
    "run_worker",
]
