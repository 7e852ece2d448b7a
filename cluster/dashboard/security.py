"""Who may change the cluster: one admin token, checked in constant time, and an audit log.

Reading is open by default (the server binds to 127.0.0.1 unless told otherwise); every action
that changes something needs `Authorization: Bearer <token>`. The token never appears in a page,
a response or a log line: the audit log names the caller by address and optional operator name.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import deque

from fastapi import HTTPException, Request

audit_log = logging.getLogger("moray.dashboard.audit")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class AdminGuard:
    """FastAPI dependency: 401 unless the request carries the admin token."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the dashboard needs a non-empty admin token")
        self._token = token.encode()

    def allows(self, request: Request) -> bool:
        return hmac.compare_digest(bearer(request).encode(), self._token)

    def __call__(self, request: Request) -> None:
        if not self.allows(request):
            raise HTTPException(status_code=401, detail="this action needs the dashboard's admin token "
                                "(Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})


class AuditTrail:
    """Every accepted mutation: who (client address, operator header), when, what, and how it ended."""

    def __init__(self, keep: int = 200):
        self.entries: deque[dict] = deque(maxlen=keep)

    def record(self, request: Request, action: str, target: str, outcome: str) -> dict:
        client = request.client.host if request.client else "unknown"
        operator = request.headers.get("x-moray-operator", "")[:64]
        entry = {"time": time.time(), "who": f"{operator}@{client}" if operator else client, "action": action,
                 "target": target, "outcome": outcome}
        self.entries.append(entry)
        audit_log.info("%(who)s %(action)s %(target)s: %(outcome)s", entry)
        return entry
