"""The API in its own process for fault tests: ``python api_proc.py <port>`` (settings from ``ONP_*``).

``ONP_TEST_DIE_BEFORE_ENQUEUE=1`` SIGKILLs the process right after the job row is committed and
before the task is published — the exact window the outbox/reconciler exists for. The production
code is untouched: the test replaces the ``enqueue`` name that ``api.repairs`` calls.
"""
from __future__ import annotations

import os
import signal
import sys

import uvicorn

import slow_defense  # noqa: F401  (method "slow", for validation)
from api.app import create_app

if os.environ.get("ONP_TEST_DIE_BEFORE_ENQUEUE") == "1":
    import api.repairs

    def _die(*_args: object, **_kw: object) -> bool:
        os.kill(os.getpid(), signal.SIGKILL)
        return False

    api.repairs.enqueue = _die  # type: ignore[assignment]

if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
