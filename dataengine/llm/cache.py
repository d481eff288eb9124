"""On-disk cache of LLM replies, so a rerun or a resume never pays for the same request twice.

The key is a hash of everything that decides the reply: model, messages and generation parameters
(temperature, top_p, max_tokens, seed, response format). One small JSON file per reply, written
atomically, under `<dir>/<key[:2]>/<key>.json`: any number of workers on a shared filesystem can read
and write it without locks, and a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dataengine.core.atomic import write_text_atomic


@dataclass(frozen=True)
class CachedReply:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    payload = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class ResponseCache:
    """Replies by request key; `get` is None on a miss (or an unreadable entry, which is then refetched)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> CachedReply | None:
        try:
            return CachedReply(**json.loads(self._path(key).read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def put(self, key: str, reply: CachedReply) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(asdict(reply), ensure_ascii=False))
