"""`llava_synthesis_mapper`: LLaVA-style instruction data from captions (and boxes) of each image.

Each row gets one response type, drawn from `mix` by a hash of its uid (LLaVA-Instruct-158K had 58K
conversations, 23K detailed descriptions and 77K complex-reasoning samples: the default weights).
The context is the image's captions, best first (CapFilt's `captions_kept` when that ran, else the
caption), plus its boxes when the input has them. The op asks and checks; a backend writes, behind one
`generate(requests)` (`dataengine.llm.backends`):

- `openai`: any OpenAI-compatible endpoint through the `openai` async client (`backends/openai_chat.py`),
  with a reply cache, usage/cost accounting and a budget.
- `vllm`: generation inside the cluster through Ray Data LLM on GPU nodes (`backends/vllm_engine.py`):
  the op runs twice around the engine, writing requests, then reading the replies the engine wrote.
- `template`: no LLM; our templates turn captions and boxes into samples (`backends/template.py`).

Every reply is parsed and validated (`dataengine.llm.validate`); answers naming objects absent from
the context are flagged (`ungrounded_objects`) and, by default, rejected. A failure is a rejection
with a reason (`llm_invalid:<why>`, `llm_ungrounded`, `llm_error:<why>`), never a silent drop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.core.fields import OPERATIONAL
from dataengine.io.imaging import ImageRejected
from dataengine.llm.backends.base import Backend, Reply, Request, row_seed
from dataengine.llm.backends.openai_chat import OpenAIBackendConfig
from dataengine.llm.backends.template import TemplateBackend, Templates
from dataengine.llm.backends.vllm_engine import EngineReplies, VLLMBackendConfig
from dataengine.llm.grounding import ObjectVocabulary, ungrounded_objects
from dataengine.llm.prompts import RESPONSE_TYPES, build_messages, load_prompt_sets, parse_reply
from dataengine.llm.validate import InvalidConversation, Limits, validate_conversation
from dataengine.ops.base import RayLLMStage, register_op
from dataengine.ops.llm_common import LLMOp, LLMOpConfig, engine_requests, engine_stage, image_data_url, open_openai

log = logging.getLogger(__name__)

ResponseType = Literal["conversation", "detail", "reasoning"]
LLAVA_INSTRUCT_MIX: dict[str, float] = {"conversation": 58.0, "detail": 23.0, "reasoning": 77.0}


class LlavaSynthesisConfig(LLMOpConfig):
    """Instruction synthesis settings."""

    op: Literal["llava_synthesis_mapper"] = "llava_synthesis_mapper"
    backend: Literal["openai", "vllm", "template"] = Field(default="template", description="Who writes the samples.")
    openai: OpenAIBackendConfig | None = Field(default=None, description="Endpoint settings (backend: openai).")
    vllm: VLLMBackendConfig | None = Field(default=None, description="Engine settings (backend: vllm).")
    mix: dict[ResponseType, float] = Field(default_factory=lambda: dict(LLAVA_INSTRUCT_MIX),
                                           description="Relative weight of each response type (LLM backends).")
    prompts_dir: str | None = Field(default=None, description="Prompt files; default: pipelines/prompts of this package.")
    object_vocabulary: str | None = Field(default=None, description="Grounding vocabulary file; default: prompts_dir/objects.txt.")
    reject_ungrounded: bool = Field(default=True, description="Reject answers naming objects the context does not have.")
    transient_errors: Literal["fail", "reject"] = Field(
        default="fail", json_schema_extra=OPERATIONAL, description="After retries, a timeout/429/5xx either stops the run (resume later: replies "
        "already received are cached) or rejects the row as llm_error:<why>.")
    cache_dir: str | None = Field(default=None, json_schema_extra=OPERATIONAL, description="Reply cache; default: <run>/_state/llm-cache. Share it "
                                                            "between runs to never pay twice for the same request.")
    max_qa_turns: int = Field(default=3, ge=0, description="template: short question turns after the first one.")
    detailed_fraction: float = Field(default=0.5, ge=0, le=1,
                                     description="template: share of rows with boxes that get a detailed description.")
    max_turns: int = Field(default=20, gt=1, description="Longest conversation accepted, in turns.")
    max_turn_chars: int = Field(default=2000, gt=0, description="Longest single turn accepted.")
    max_total_chars: int = Field(default=8000, gt=0, description="Longest conversation accepted, all turns.")
    absent_labels: list[str] = Field(default_factory=list, description="template: labels to ask about when "
                                     "absent (POPE-style 'no' questions); empty: only present labels are asked about.")
    short_first_fraction: float = Field(default=0.0, ge=0, le=1, description="template: share of rows whose "
                                        "image comes with a short question (VQA style) instead of a description request.")
    seed: int = Field(default=0, description="Seeds the per-row choice of type, question and template.")
    send_image: bool = Field(default=False, description="LLM backends: show the model the image itself (a vision-"
                             "language model), re-encoded as JPEG with its long side at most image_max_side, as a "
                             "base64 data URL; the captions and boxes still go along as context.")
    image_max_side: int = Field(default=768, gt=0, description="send_image: longest side sent, in pixels.")
    concurrency: int | None = Field(default=1, gt=0, description="Actors; requests in flight cluster-wide = this x max_concurrency.")
    batch_size: int = Field(default=256, gt=0, description="Rows per batch; openai default: 8 x max_concurrency.")

    @model_validator(mode="before")
    @classmethod
    def _batch_for_concurrency(cls, data: Any) -> Any:
        """openai: default batch = 8 x max_concurrency. A batch waits for its slowest request, so with
        one wave per batch the endpoint idles at every batch boundary; eight waves amortise that."""
        if isinstance(data, dict) and "batch_size" not in data and data.get("backend") == "openai":
            section = data.get("openai")
            limit = section.get("max_concurrency") if isinstance(section, dict) else getattr(section, "max_concurrency", None)
            data = {**data, "batch_size": 8 * (limit if isinstance(limit, int) and limit > 0 else 32)}
        return data

    @model_validator(mode="after")
    def _backend_settings(self) -> "LlavaSynthesisConfig":
        if self.backend == "openai" and self.openai is None:
            raise ValueError("backend openai needs an `openai:` section (model, base_url, ...)")
        if self.backend == "vllm" and self.vllm is None:
            raise ValueError("backend vllm needs a `vllm:` section (model, engine_kwargs, ...)")
        if self.backend != "template" and not any(w > 0 for w in self.mix.values()):
            raise ValueError("mix: at least one response type needs a weight > 0")
        if any(w < 0 for w in self.mix.values()):
            raise ValueError("mix: weights must be >= 0")
        if self.send_image and self.backend == "template":
            raise ValueError("send_image needs a model that sees images: backend openai or vllm, not template")
        return self

    @property
    def model_label(self) -> str:
        if self.backend == "openai" and self.openai:
            return self.openai.model
        if self.backend == "vllm" and self.vllm:
            return self.vllm.model
        return "template"



def pick_type(uid: str, seed: int, mix: dict[str, float]) -> str:
    """The response type of a row: weighted by `mix`, fixed by (uid, seed) so a resume agrees."""
    types = [t for t in RESPONSE_TYPES if mix.get(t, 0) > 0]
    total = sum(mix[t] for t in types)
    u = (row_seed(uid, seed) % 1_000_003) / 1_000_003 * total
    for t in types:
        u -= mix[t]
        if u < 0:
            return t
    return types[-1]


def row_context(row: dict[str, Any]) -> dict[str, Any]:
    """Captions best first (CapFilt's kept list when present) and boxes; `ValueError` on malformed boxes."""
    captions = row.get(C.CAPTIONS_KEPT) or [c for c in (row.get(C.CAPTION_BEST) or row.get(C.CAPTION),) if c]
    if row.get(C.VLM_CAPTION):  # a model that saw the image wrote it: the most detailed, first (caption-then-QA)
        captions = [row[C.VLM_CAPTION], *(c for c in captions if c != row[C.VLM_CAPTION])]
    context: dict[str, Any] = {"captions": [c.strip() for c in captions if c and c.strip()]}
    if row.get(C.BOXES):
        try:
            boxes = json.loads(row[C.BOXES])
        except json.JSONDecodeError as e:
            raise ValueError(f"boxes are not JSON: {e.msg}") from None
        if not isinstance(boxes, list):
            raise ValueError("boxes must be a JSON list")
        objects = []
        for b in boxes:
            box = b.get("box") if isinstance(b, dict) else None
            if not isinstance(b, dict) or not b.get("label") or not isinstance(box, list) or len(box) != 4:
                raise ValueError(f"box entry {b!r} needs label and box [x1, y1, x2, y2]")
            entry = {"label": str(b["label"]), "box": [round(float(v), 3) for v in box]}
            if b.get("attributes"):
                entry["attributes"] = b["attributes"]
            objects.append(entry)
        if objects:
            context["objects"] = objects
    return context


@register_op
class LlavaSynthesisMapper(LLMOp[LlavaSynthesisConfig]):
    """Write one LLaVA sample per image with the configured backend; validate it; reject what fails."""

    Config = LlavaSynthesisConfig

    def __init__(self, config: LlavaSynthesisConfig) -> None:
        super().__init__(config)

        self.limits = Limits(config.max_turns, config.max_turn_chars, config.max_total_chars)
        self.vocabulary = ObjectVocabulary.load(config.object_vocabulary or
                                                (Path(config.prompts_dir) / "objects.txt" if config.prompts_dir else None))
        if config.backend != "template":
            self.prompts = load_prompt_sets(config.prompts_dir, [t for t in RESPONSE_TYPES if config.mix.get(t, 0) > 0])
        self.backend: Backend = _open_backend(config)

    @classmethod
    def ray_llm_stage(cls, config: LlavaSynthesisConfig) -> RayLLMStage | None:
        if not config.uses_engine or config.vllm is None:
            return None
        return engine_stage(config, config.vllm, images=config.send_image)

    def process(self, batch: pa.Table) -> pa.Table:
        config = self.config
        wanted = _CONTEXT_COLUMNS | ({C.IMAGE} if self._sends_images() else set())  # image bytes only when sent
        rows = batch.select([c for c in batch.column_names if c in wanted]).to_pylist()
        out = [_empty_result() for _ in rows]
        requests = self.requests(rows, self._contexts(rows, out))  # lazily: each is sent as soon as it is built
        if config.preparing:
            asked = list(requests)  # built first: building a row's request settles its reject reason
            return engine_requests(asked, [r[C.REJECT_REASON] for r in out])
        failed: str | None = None
        for request, reply in self.backend.generate(requests):
            result = out[request.index]
            result.update({C.INSTRUCTION_TYPE: reply.kind or request.kind, C.LLM_MODEL: reply.model,
                           C.LLM_PROMPT_TOKENS: reply.prompt_tokens, C.LLM_COMPLETION_TOKENS: reply.completion_tokens,
                           C.LLM_COST_USD: reply.cost_usd, C.LLM_CACHED: reply.cached})
            if reply.error is not None:
                if config.transient_errors == "fail":  # stop, once the requests in flight are answered and cached
                    failed = failed or f"LLM request for row {request.uid} failed after retries ({reply.error})"
                result[C.REJECT_REASON] = f"llm_error:{reply.error}"
            elif reply.turns is not None:
                self._accept(reply.turns, request.context, None, result)
            else:
                self._parse_and_accept(request, reply, result)
        if failed:
            raise RuntimeError(f"{failed}; the run stops here and a rerun resumes (replies received so far are cached)")
        return pa.table({name: [r[name] for r in out] for name in _RESULT_COLUMNS})

    def _contexts(self, rows: list[dict], out: list[dict]) -> Iterator[dict[str, Any] | None]:
        """Each row's context (captions, boxes; its image as a data URL when sent), or None with the
        row's reject reason set in `out`."""
        for row, result in zip(rows, out):
            try:
                context = row_context(row)
            except ValueError as e:
                result[C.REJECT_REASON], context = "invalid_boxes", None
                log.debug("row %s: %s", row[C.UID], e)
            if context is not None and not context["captions"] and not context.get("objects"):
                result[C.REJECT_REASON], context = "no_context", None
            if context is not None and self._sends_images():
                if not row.get(C.IMAGE):
                    result[C.REJECT_REASON], context = "no_image", None
                else:
                    try:
                        row[_IMAGE_URL] = image_data_url(row[C.IMAGE], self.config.image_max_side)
                    except ImageRejected as e:
                        result[C.REJECT_REASON], context = e.reason, None
            yield context

    def type_and_question(self, uid: str) -> tuple[str, str | None]:
        """A row's response type and, for `detail`, the question we ask (LLaVA picks it from a list too)."""
        config = self.config
        kind = pick_type(uid, config.seed, config.mix)
        questions = self.prompts[kind].questions
        return kind, questions[row_seed(uid, config.seed + 1) % len(questions)] if kind == "detail" else None

    def requests(self, rows: list[dict], contexts: Iterable[dict | None]) -> Iterator[Request]:
        """A request for every row with a context; LLM backends get the response type, question and messages."""
        for i, (row, context) in enumerate(zip(rows, contexts)):
            if context is None:
                continue
            if self.config.backend == "template":
                yield Request(i, row[C.UID], context, row=row)
                continue
            kind, question = self.type_and_question(row[C.UID])
            messages = build_messages(self.prompts[kind], context, question, row.get(_IMAGE_URL))
            yield Request(i, row[C.UID], context, kind, question, messages, row)

    def _sends_images(self) -> bool:
        """The image goes to the model: asked for, and not the vllm finish phase (it reads replies only)."""
        config = self.config
        return config.send_image and not config.finishing

    # ---- checks shared by the backends ----

    def _parse_and_accept(self, request: Request, reply: Reply, result: dict) -> None:
        try:
            turns = parse_reply(reply.text, reply.finish_reason, request.question)
        except InvalidConversation as e:
            result[C.REJECT_REASON], result[C.LLM_RAW_RESPONSE] = e.reject_reason, reply.text
            return
        if request.kind == "detail":
            turns = turns[:2]
        self._accept(turns, request.context, reply.text, result)

    def _accept(self, turns: list[dict], context: dict, raw: str | None, result: dict) -> None:
        config = self.config
        try:
            turns = validate_conversation(turns, self.limits)
        except InvalidConversation as e:
            result[C.REJECT_REASON], result[C.LLM_RAW_RESPONSE] = e.reject_reason, raw
            return
        if self.config.send_image and not context.get("objects"):
            missing = []  # the model saw the image; captions alone cannot say what it may name (boxes can)
        else:
            missing = ungrounded_objects(turns, context, self.vocabulary)
        result[C.UNGROUNDED_OBJECTS] = missing
        result[C.CONVERSATIONS] = json.dumps(turns, ensure_ascii=False)
        if missing and config.reject_ungrounded:
            result[C.REJECT_REASON], result[C.LLM_RAW_RESPONSE] = "llm_ungrounded", raw


#: what the op reads of a row: its id, its texts and boxes, and (vllm) the engine's reply
_CONTEXT_COLUMNS = frozenset({C.UID, C.CAPTION, C.CAPTION_BEST, C.CAPTIONS_KEPT, C.VLM_CAPTION, C.BOXES, C.LLM_REQUEST,
                              C.LLM_REPLY_TEXT, C.LLM_REPLY_FINISH, C.LLM_REPLY_PROMPT_TOKENS,
                              C.LLM_REPLY_COMPLETION_TOKENS})

_IMAGE_URL = "_image_url"  # a row's image as the data URL sent (send_image)

_RESULT_COLUMNS = (C.INSTRUCTION_TYPE, C.CONVERSATIONS, C.LLM_MODEL, C.LLM_PROMPT_TOKENS, C.LLM_COMPLETION_TOKENS,
                   C.LLM_COST_USD, C.LLM_CACHED, C.LLM_RAW_RESPONSE, C.UNGROUNDED_OBJECTS, C.REJECT_REASON)


def _empty_result() -> dict[str, Any]:
    return dict.fromkeys(_RESULT_COLUMNS)


def _open_backend(config: LlavaSynthesisConfig) -> Backend:
    """The configured backend, behind `generate()`."""
    if config.backend == "template":
        return TemplateBackend(Templates.load(config.prompts_dir), config.seed, config.max_qa_turns,
                               config.detailed_fraction, tuple(config.absent_labels), config.short_first_fraction)
    if config.backend == "vllm":
        return EngineReplies(config.model_label)

    assert config.openai is not None  # the config's validator demands the section
    return open_openai(config.openai, config._run_dir, config.cache_dir, config._api_key)
