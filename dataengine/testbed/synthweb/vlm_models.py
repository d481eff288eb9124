"""The demo VLM's language model: a tiny Llama trained on the synthetic web's text.

A LLaVA starts from a pre-trained LM that already speaks the language of its instructions. No real
LM can be downloaded here, so the demo trains one: a 2-layer Llama (rotary positions, so the 64 image
tokens plus text fit; the demo's GPT-2 has 64 positions) on true captions and on template
conversations about clean scenes rendered in the LLaVA chat format, but without images. It learns
the questions and the form of the answers, not what a given image shows: that is what the projector
and stage 2 add. The vision tower is the demo CLIP's, converted (`dataengine.train.convert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VLM_RECIPE = {"version": 1, "texts": 2000, "embd": 128, "layers": 2, "heads": 4, "epochs": 2, "lr": 3e-3,
              "batch": 64, "vocab": 800, "seed": 4321}


def _texts(n: int, seed: int) -> list[str]:
    """Captions and chat-formatted template conversations of `n` clean scenes."""
    import json

    import numpy as np
    from jinja2 import Template

    from dataengine.llm.backends.template import Templates, template_conversation
    from dataengine.testbed.synthweb.build import boxes_json
    from dataengine.testbed.synthweb.scenes import KINDS, caption_scene, generate_scene
    from dataengine.train.model import LLAVA_CHAT_TEMPLATE

    template, templates = Template(LLAVA_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")), Templates.load()
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = generate_scene(rng)
        caption = caption_scene(scene, rng)
        objects = json.loads(boxes_json([o.as_dict() for o in scene.objects]))
        _, turns = template_conversation({"objects": objects, "captions": [caption]}, seed + i, templates, 4, 0.5, KINDS)
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<image>\n", "")}
                    for t in turns]
        texts.append(caption)
        texts.append(template.render(messages=messages, eos_token="<|endoftext|>", add_generation_prompt=False))
    return texts


def train_demo_vlm_lm(out_dir: Path, recipe: dict[str, Any] = VLM_RECIPE) -> Path:
    """Train and save the tiny Llama (with its BPE tokenizer) the demo VLM starts from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataengine.testbed.synthweb.tokenizer import build_caption_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    texts = _texts(recipe["texts"], recipe["seed"])
    tokenizer = build_caption_tokenizer(texts, out_dir, vocab_size=recipe["vocab"])
    torch.manual_seed(recipe["seed"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe["embd"], intermediate_size=recipe["embd"] * 3,
                         num_hidden_layers=recipe["layers"], num_attention_heads=recipe["heads"],
                         num_key_value_heads=recipe["heads"], max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:256] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    steps = recipe["epochs"] * ((len(encoded) + recipe["batch"] - 1) // recipe["batch"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(encoded)).tolist()
        for start in range(0, len(order), recipe["batch"]):
            rows = [encoded[i] for i in order[start:start + recipe["batch"]]]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().save_pretrained(str(out_dir))
    return out_dir
