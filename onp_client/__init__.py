"""Python client of the onp-repair service.

>>> from onp_client import Client
>>> with Client("http://127.0.0.1:8000", "onp_...") as c:
...     result = c.repair("model.safetensors", "clean.npz", method="onp").wait()
...     print(result.metrics.after, result.model_path)
"""
from .client import Client, Repair, __version__
from .config import resolve
from .errors import (AuthError, ChecksumMismatch, Conflict, JobFailed, NotFound, OnpError, ServerError,
                     ValidationFailed, WaitTimeout)
from .models import Event, Job, JobPage, MetricValues, Metrics, RepairResult

__all__ = ["AuthError", "ChecksumMismatch", "Client", "Conflict", "Event", "Job", "JobFailed", "JobPage",
           "MetricValues", "Metrics", "NotFound", "OnpError", "Repair", "RepairResult", "ServerError",
           "ValidationFailed", "WaitTimeout", "__version__", "resolve"]
