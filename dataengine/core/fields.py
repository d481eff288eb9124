"""Config fields that do not decide a run's outputs, and the part of a config that does.

Timeouts, concurrency, an LLM budget, worker counts: marked `json_schema_extra=OPERATIONAL`, they are
left out of the spec and training hashes, so a stopped run resumes with them changed. Stage configs,
LLM backends and the trainer's config all mark fields this way; the spec hashes what is left.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

#: `json_schema_extra` of a field that does not decide a run's outputs
OPERATIONAL: dict[str, Any] = {"operational": True}


def decisive(value: Any) -> Any:
    """`value` as JSON data without its models' operational fields."""
    if isinstance(value, BaseModel):
        return {name: decisive(getattr(value, name)) for name, info in type(value).model_fields.items()
                if info.json_schema_extra != OPERATIONAL}
    if isinstance(value, (list, tuple)):
        return [decisive(v) for v in value]
    if isinstance(value, dict):
        return {str(k): decisive(v) for k, v in value.items()}
    return to_jsonable_python(value)


def payload_hash(payload: Any) -> str:
    """16 hex digits of SHA-256 over `payload` as sorted-key JSON: the spec's and the trainer's hashes."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
