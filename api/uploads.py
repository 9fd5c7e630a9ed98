"""Streaming multipart parsing with a size limit per field.

Starlette's ``request.form()`` spools whole files before anyone can look at their
size; a 10 GB upload would fill the disk before being refused. Here the body is fed
chunk by chunk to python-multipart's parser and every part is written straight to a
temporary file (hashing as it goes), so an oversized part is refused with 413 as soon
as it crosses its limit, and memory stays flat whatever the upload size.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, parse_options_header


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    path: Path
    size: int = 0
    sha256: str = ""

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass
class Form:
    parts: dict[str, Part] = field(default_factory=dict)

    def get(self, name: str) -> Part | None:
        return self.parts.get(name)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class _TooLarge(Exception):
    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"field {name!r} exceeds the limit of {_human(limit)} ({limit} bytes)")


class _BadForm(Exception):
    pass


async def parse_form(request: Request, limits: dict[str, int], tmpdir: Path, max_parts: int = 16) -> Form:
    """Parse ``request``'s multipart body into files under ``tmpdir``; only fields named in ``limits`` are accepted."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(415, "expected a multipart/form-data body (fields: model, data, manifest, options, "
                                 "triggered, target)")
    total_limit = sum(limits.values()) + 64 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > total_limit:
        raise HTTPException(413, f"request body of {_human(int(declared))} exceeds the limit of {_human(total_limit)}")

    form = Form()
    state: dict[str, Any] = {"headers": {}, "field": b"", "value": b"", "part": None, "file": None, "hash": None}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get("content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp[b"filename"].decode("utf-8", "replace") if b"filename" in disp else None
        if name not in limits:
            raise _BadForm(f"unknown form field {name!r}; expected one of {', '.join(sorted(limits))}")
        if name in form.parts:
            raise _BadForm(f"form field {name!r} given more than once")
        if len(form.parts) >= max_parts:
            raise _BadForm("too many form fields")
        ctype_part = state["headers"].get("content-type", b"application/octet-stream").decode("latin-1")
        safe = "".join(c for c in os.path.basename(filename or name) if c.isalnum() or c in "._-")[-100:] or name
        part = Part(name, filename, ctype_part, tmpdir / f"{name}-{safe}")
        state["part"], state["file"], state["hash"] = part, open(part.path, "wb"), hashlib.sha256()
        form.parts[name] = part

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: Part = state["part"]
        chunk = data[start:end]
        part.size += len(chunk)
        if part.size > limits[part.name]:
            raise _TooLarge(part.name, limits[part.name])
        state["file"].write(chunk)
        state["hash"].update(chunk)

    def on_part_end() -> None:
        f: IO[bytes] | None = state["file"]
        if f is not None:
            f.close()
            state["part"].sha256 = state["hash"].hexdigest()
        state.update(headers={}, part=None, file=None, hash=None)

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except _TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except _BadForm as exc:
        raise HTTPException(422, str(exc)) from None
    except OSError:  # the spool folder is full or failing: the server's fault (507/503), not a malformed body
        raise
    except Exception as exc:  # python-multipart's own errors: a malformed body
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    finally:
        if state["file"] is not None:
            state["file"].close()
    return form
