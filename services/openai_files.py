"""The HTTP front door's `/v1/files`: uploaded files on local disk (one data file and one JSON record per
id), so an upload outlives a restart of the front door. Bulk-job outputs are not stored here: their ids
(`file-output-<job>`, `file-errors-<job>`) are read from the router's Batch/GetResults when asked for."""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

OUTPUT_PREFIX = "file-output-"
ERRORS_PREFIX = "file-errors-"
_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,80}$")
PURPOSES = ("batch", "user_data")


def valid_id(file_id: str) -> bool:
    return bool(_ID.match(file_id))


def job_file(file_id: str) -> tuple[str, str] | None:
    """(job id, "output" | "errors") for the id of a job's output or error file, else None."""
    for prefix, which in ((OUTPUT_PREFIX, "output"), (ERRORS_PREFIX, "errors")):
        if file_id.startswith(prefix):
            return file_id[len(prefix):], which
    return None


class FileStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        return self.folder / f"{file_id}.data", self.folder / f"{file_id}.json"

    def add(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = "file-" + uuid.uuid4().hex[:24]
        data_path, meta_path = self._paths(file_id)
        rec = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        tmp = data_path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, data_path)   # the record appears only once the data is whole
        meta_path.write_text(json.dumps(rec))
        return rec

    def get(self, file_id: str) -> dict | None:
        if not valid_id(file_id):
            return None
        meta = self._paths(file_id)[1]
        return json.loads(meta.read_text()) if meta.exists() else None

    def content(self, file_id: str) -> bytes | None:
        if self.get(file_id) is None:
            return None
        return self._paths(file_id)[0].read_bytes()

    def list(self, purpose: str | None = None) -> list[dict]:
        recs = [json.loads(p.read_text()) for p in self.folder.glob("file-*.json")]
        recs = [r for r in recs if purpose is None or r["purpose"] == purpose]
        return sorted(recs, key=lambda r: r["created_at"], reverse=True)

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        for p in self._paths(file_id):
            p.unlink(missing_ok=True)
        return True
