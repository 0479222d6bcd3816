"""Session recordings from livekit-agents: reading the multipart upload and storing it.

livekit-agents posts one ``multipart/form-data`` upload per session (PROTOCOL.md §6 of
the fixtures): ``header`` (a ``livekit.MetricsRecordingHeader`` protobuf), optional
``chat_history`` (JSON) and optional ``audio`` (Ogg/Opus). ``read_upload`` checks all of
it before anything is written, raising ``UploadError`` (a 4xx status and a message
naming the problem); ``RecordingWriter.save`` then writes the audio file and the row so
that a failure leaves neither: the audio goes to a temporary file, is renamed into
place, and is removed again if the row cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from collector.signals_storage import Recording, SQLiteSignalStore

__all__ = ["OGG_MAGIC", "RecordingWriter", "UploadError", "read_upload"]

OGG_MAGIC = b"OggS"
"""The capture pattern every Ogg page starts with."""
_PARTS = ("header", "chat_history", "audio")


class UploadError(Exception):
    """The upload is refused: ``status`` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_upload(
    request: web.Request, project: str, max_size: int, max_audio_size: int
) -> Recording:
    """The checked recording of a multipart upload; ``UploadError`` when it is not one:
    not multipart (415), larger than ``max_size`` in all or ``max_audio_size`` of audio
    (413), malformed framing, a missing or undecodable header part, chat history that
    is not JSON, audio that is not Ogg (400)."""
    from livekit.protocol.metrics import MetricsRecordingHeader

    if request.content_type != "multipart/form-data":
        raise UploadError(
            415, f"expected multipart/form-data, got {request.content_type or 'no content type'}"
        )
    length = request.content_length
    if length is not None and length > max_size:
        raise UploadError(413, f"upload larger than max_recording_size ({max_size} bytes)")
    parts: dict[str, bytes] = {}
    total = 0
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise UploadError(400, "nested multipart parts are not expected")
            name = part.name or ""
            limit = max_audio_size if name == "audio" else max_size
            chunks: list[bytes] = []
            size = 0
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                total += len(chunk)
                if size > limit:
                    what = "audio part" if name == "audio" else f"part {name!r}"
                    raise UploadError(413, f"{what} larger than {limit} bytes")
                if total > max_size:
                    raise UploadError(
                        413, f"upload larger than max_recording_size ({max_size} bytes)"
                    )
                chunks.append(chunk)
            if name in _PARTS:
                if name in parts:
                    raise UploadError(400, f"part {name!r} appears twice")
                parts[name] = b"".join(chunks)
    except UploadError:
        raise
    except (ValueError, AssertionError, LookupError, EOFError) as exc:
        # aiohttp's reader: no boundary, a missing start or close boundary, bad headers.
        raise UploadError(400, f"malformed multipart body: {exc or type(exc).__name__}") from None

    if "header" not in parts:
        raise UploadError(400, "missing the 'header' part (a livekit.MetricsRecordingHeader)")
    try:
        header = MetricsRecordingHeader.FromString(parts["header"])
    except DecodeError as exc:
        raise UploadError(400, f"header part is not a MetricsRecordingHeader: {exc}") from None
    if not header.room_id:
        raise UploadError(400, "header part has no room_id")
    chat_history = None
    if "chat_history" in parts:
        try:
            chat_history = json.loads(parts["chat_history"])
        except (ValueError, RecursionError) as exc:
            raise UploadError(400, f"chat_history part is not JSON: {exc}") from None
    audio = parts.get("audio")
    if audio is not None and not audio.startswith(OGG_MAGIC):
        raise UploadError(400, "audio part is not Ogg (it does not start with 'OggS')")
    summary: Any = header.session_summary or None
    if summary is not None:
        with contextlib.suppress(ValueError, RecursionError):
            summary = json.loads(summary)
    header_fields = json_format.MessageToDict(header, preserving_proto_field_name=True)
    header_fields.pop("session_summary", None)
    return Recording(
        project=project,
        room_id=header.room_id,
        job_id=header.job_id,
        start_ns=header.start_time.seconds * 1_000_000_000 + header.start_time.nanos,
        duration_ms=header.duration,
        header=header_fields,
        session_summary=summary,
        chat_history=chat_history,
        audio=audio,
        received_ns=time.time_ns(),
    )


class RecordingWriter:
    """Stores recordings: the audio under ``directory`` (one file per project, room and
    job, so a re-posted upload replaces its own), the rest as a row of ``store``."""

    def __init__(self, directory: Path, store: SQLiteSignalStore):
        self.directory = Path(directory)
        self.store = store

    def audio_path(self, recording: Recording) -> Path:
        name = hashlib.sha256(
            f"{recording.project}\x00{recording.room_id}\x00{recording.job_id}".encode()
        ).hexdigest()[:32]
        return self.directory / f"{name}.ogg"

    async def save(self, recording: Recording) -> None:
        """Write the audio file and the row, both or neither (raises what failed)."""
        path = None
        if recording.audio is not None:
            path = self.audio_path(recording)
            await asyncio.to_thread(_write_file, path, recording.audio)
        try:
            await self.store.store_recording(recording, path)
        except BaseException:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise


def _write_file(path: Path, data: bytes) -> None:
    """``data`` at ``path``, complete or not at all (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
