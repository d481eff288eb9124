"""The test bed's tiny tokenizers: byte-level BPE trained on synthetic captions in a second, so the demo
and the tests' language models need no downloaded vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_caption_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 600) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, saved with `save_pretrained` (GPT-2's family)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", pad_token="<pad>")
    wrapped.save_pretrained(str(out_dir))
    return wrapped
