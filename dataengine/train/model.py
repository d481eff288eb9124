"""Assemble a LLaVA-style model as a stock `transformers.LlavaForConditionalGeneration`.

A vision tower (CLIP or SigLIP, transformers or open_clip format) and a causal LM are joined by a
projector (`mlp2x_gelu`, LLaVA-1.5's, or `linear`, LLaVA v1's). The result is the class the
`llava-hf` checkpoints use, saved with its `LlavaProcessor` and chat template, so a checkpoint loads
with plain `from_pretrained` and `processor.apply_chat_template` and in the serving stacks that know
that class. `linear` is the stock two-layer projector with an identity activation and its second
layer fixed to the identity: the same function as LLaVA v1's single linear layer, in the stock layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from dataengine.models.sources import cache_dir, from_local_or_hub, resolve_model_ref
from dataengine.train.config import ModelSpec
from dataengine.train.convert import convert_open_clip_vision, is_open_clip_dir

log = logging.getLogger(__name__)

#: LLaVA-1.5's conversation format (`USER: <image>\n... ASSISTANT: ...</s>`). Assistant replies sit in
#: `{% generation %}` blocks so `return_assistant_tokens_mask` marks exactly the tokens that are trained on.
LLAVA_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT:' }}"
    "{% generation %}{{ ' ' + render(message['content']) + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_VISION_CLASSES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                   "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}


def _converted_dir(src: Path) -> Path:
    """Where an open_clip tower's transformers copy is cached, keyed by its weights' identity."""
    weights = sorted(src.glob("open_clip_model*"))
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights)
    base = cache_dir()
    return base / "converted-vision" / hashlib.sha256(stamp.encode()).hexdigest()[:16]


def resolve_vision(ref: str) -> str:
    """A transformers-loadable reference for `ref`: open_clip directories are converted once and cached."""
    path = Path(resolve_model_ref(ref)).expanduser()
    if path.is_dir() and is_open_clip_dir(path):
        out = _converted_dir(path)
        if not (out / "config.json").is_file():
            tmp = out.with_name(out.name + f".partial-{os.getpid()}")
            convert_open_clip_vision(path, tmp)
            tmp.replace(out) if not out.exists() else None
        return str(out)
    return str(path) if path.exists() else ref


def load_vision_tower(ref: str) -> tuple[Any, Any]:
    """The vision tower (without any text half or projection head) and its image processor."""
    import transformers

    source = resolve_vision(ref)

    def load(src: str, local_only: bool) -> tuple[Any, Any]:
        config = transformers.AutoConfig.from_pretrained(src, local_files_only=local_only)
        cls_name = _VISION_CLASSES.get(config.model_type)
        if cls_name is None:
            raise ValueError(f"{ref}: model_type {config.model_type!r} is not a CLIP or SigLIP vision tower "
                             f"(supported: {', '.join(sorted(_VISION_CLASSES))})")
        tower = getattr(transformers, cls_name).from_pretrained(src, local_files_only=local_only)
        processor = transformers.AutoImageProcessor.from_pretrained(src, local_files_only=local_only)
        return tower, processor

    return from_local_or_hub(source, load, "vision tower")


def _lm_parts(lm: Any) -> tuple[Any, Any, bool]:
    """(base model, lm head, tied) of a causal LM; untied when LLaVA's tying cannot follow the LM's layout."""
    import torch

    base, head = lm.base_model, lm.get_output_embeddings()
    tied = bool(lm.config.tie_word_embeddings)
    if tied and not hasattr(base, "embed_tokens"):
        # LlavaForConditionalGeneration ties lm_head to `language_model.embed_tokens`; GPT-2 style models
        # name it `wte`, so keep the head as its own (equal) copy
        untied = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        untied.weight = torch.nn.Parameter(head.weight.detach().clone())
        if head.bias is not None:
            untied.bias = torch.nn.Parameter(head.bias.detach().clone())
        head, tied = untied, False
    return base, head, tied


def _add_image_token(tokenizer: Any, image_token: str) -> int:
    from tokenizers import AddedToken

    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer.convert_tokens_to_ids(image_token)


def _num_image_tokens(vision_config: Any) -> int:
    """Patches per image: CLIP's CLS token is dropped (`default` strategy) and SigLIP has none."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def build_llava(spec: ModelSpec, seed: int = 0) -> tuple[Any, Any]:
    """A fresh LLaVA model and processor from `spec.vision` + `spec.lm` (or `spec.init_from`)."""
    import torch
    import transformers
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if spec.init_from:
        return load_llava(spec.init_from)
    tower, image_processor = load_vision_tower(spec.vision or "")
    lm, tokenizer = from_local_or_hub(spec.lm or "", lambda src, local_only: (
        transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=local_only),
        transformers.AutoTokenizer.from_pretrained(src, local_files_only=local_only)), "causal LM")
    image_token_id = _add_image_token(tokenizer, spec.image_token)
    strategy = "full" if tower.config.model_type.startswith("siglip") else "default"
    base, head, tied = _lm_parts(lm)
    text_config = lm.config
    text_config.tie_word_embeddings = tied
    config = transformers.LlavaConfig(
        vision_config=tower.config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=_num_image_tokens(tower.config),
        projector_hidden_act="gelu" if spec.projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=spec.vision_feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tied)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(config)
    torch.manual_seed(seed)
    projector = LlavaMultiModalProjector(config)
    if spec.projector == "linear":
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(config.text_config.hidden_size))
            projector.linear_2.bias.zero_()
    model.model.vision_tower = tower
    model.model.language_model = base
    model.model.multi_modal_projector = projector
    model.lm_head = head
    if tied:
        model.tie_weights()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=spec.chat_template or LLAVA_CHAT_TEMPLATE,
        image_token=spec.image_token, num_additional_image_tokens=0 if strategy == "full" else 1)
    log.info("assembled LLaVA: vision %s + LM %s, projector %s, %d image tokens", spec.vision, spec.lm,
             spec.projector, config.image_seq_length)
    return model.float(), processor


def load_llava(ref: str) -> tuple[Any, Any]:
    """A LLaVA checkpoint (hub id or directory, ours or llava-hf's) and its processor."""
    import transformers

    def load(src: str, local_only: bool) -> tuple[Any, Any]:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(src, local_files_only=local_only)
        processor = transformers.AutoProcessor.from_pretrained(src, local_files_only=local_only)
        return model, processor

    return from_local_or_hub(ref, load, "LLaVA checkpoint")


def is_linear_projector(model: Any) -> bool:
    return model.config.projector_hidden_act == "linear"


def set_trainable(model: Any, stage: int) -> list[str]:
    """Freeze per LLaVA's recipe: stage 1 trains the projector only, stage 2 projector and LM; the vision
    tower is always frozen. Returns the names of trainable parameters."""
    for name, param in model.named_parameters():
        in_projector = ".multi_modal_projector." in f".{name}"
        in_lm = name.startswith(("model.language_model.", "lm_head."))
        param.requires_grad = in_projector or (stage == 2 and in_lm)
    if is_linear_projector(model):
        for param in model.model.multi_modal_projector.linear_2.parameters():
            param.requires_grad = False
    return [n for n, p in model.named_parameters() if p.requires_grad]
