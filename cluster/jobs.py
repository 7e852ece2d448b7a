"""Ray job submission for moray's commands: ship the project, run an entrypoint, follow its logs.

The job client talks to the cluster's dashboard address (http://host:8265). With Ray's token
authentication on (the default of a local Ray 2.60 cluster), the client reads the token from
RAY_AUTH_TOKEN or Ray's token file, as `ray job submit` does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".git", "data", "runs", ".device", "*.egg-info", "__pycache__", ".pytest_cache", "docs"]


class JobError(RuntimeError):
    """The cluster could not be reached or refused us; the message says which and why."""


def local_token() -> str | None:
    """The cluster token as Ray's own tools find it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token (written by `ray get-auth-token --generate` and local clusters)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def auth_headers() -> dict[str, str]:
    """The header that opens a token-authenticated cluster's dashboard APIs (none without a token)."""
    token = local_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str) -> JobSubmissionClient:
    """A job client that sends the local token when one exists: a cluster that enforces tokens
    is then reachable without extra flags, and one that does not ignores the header."""
    try:
        return JobSubmissionClient(address, headers=auth_headers() or None)
    except AuthenticationError as exc:
        raise JobError(f"{address} refused the job client: {str(exc).splitlines()[0]} "
                       "(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)") from None
    except ConnectionError as exc:
        raise JobError(f"cannot reach the Ray dashboard at {address}: {str(exc).splitlines()[0]}") from None


def submit(address: str, entrypoint: list[str]) -> tuple[JobSubmissionClient, str]:
    client = job_client(address)
    job_id = client.submit_job(
        entrypoint=" ".join(entrypoint),
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES},
    )
    return client, job_id


async def _follow(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit_and_follow(address: str, entrypoint: list[str]) -> int:
    """Submit, print the job id, stream the logs to the end; exit code 0 only if it succeeded."""
    client, job_id = submit(address, entrypoint)
    print(f"submitted job {job_id} to {address}  (ray job logs {job_id} --address {address})", flush=True)
    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    if status != JobStatus.SUCCEEDED:
        print(f"moray: job {job_id} ended {status.value}: {client.get_job_info(job_id).message}", file=sys.stderr)
        return 1
    return 0
