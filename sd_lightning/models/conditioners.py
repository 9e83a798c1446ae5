"""Conditioners: prompts → the ``conditioning`` dict a denoiser takes; they own the null condition and its dropout.

A text conditioner tokenizes (warning once per prompt that is cut), runs the text encoder, memoizes the outputs
of a frozen encoder per prompt, and returns ``encoder_hidden_states`` [B, L, D] and ``pooled_prompt_embeds``
[B, D] as StableDiffusionPipeline computes them. Classifier-free guidance trains the null condition, the
empty prompt, with probability ``drop_prob``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from sd_lightning.diffusion.noise import Randomness, draw

log = logging.getLogger(__name__)

Conditioning = dict[str, torch.Tensor]
NULL_PROMPT = ""


class TextConditioner(torch.nn.Module):
    """One CLIP text encoder (SD 1.x/2.x): its last hidden states, and the pooled (EOS) embedding."""

    kind = "clip"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, drop_prob: float = 0.1,
                 train_text_encoder: bool = False, memo_size: int = 1024, tokenizer_source: str = "tiny") -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"model.components.conditioner.drop_prob must be in [0, 1], got {drop_prob}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_source = tokenizer_source
        self.drop_prob = drop_prob
        self.train_text_encoder = train_text_encoder
        self.memo_size = memo_size
        self._memo: OrderedDict[str, Conditioning] = OrderedDict()
        self._checked: set[str] = set()

    @property
    def sequence_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def pooled_dim(self) -> int | None:
        return int(self.text_encoder.config.hidden_size)

    @property
    def trains(self) -> bool:
        """Whether any encoder weight trains (fully, or through adapters): then nothing is memoized or cached."""
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def freeze(self) -> None:
        self.text_encoder.requires_grad_(self.train_text_encoder)
        self.text_encoder.train(self.train_text_encoder and self.training)

    def train(self, mode: bool = True) -> TextConditioner:
        super().train(mode)
        self.text_encoder.train(mode and self.trains)
        return self

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the encoder's length; prompts longer than that are cut with a warning (once each)."""
        unseen = [p for p in dict.fromkeys(prompts) if p not in self._checked]
        if unseen:
            limit = self.tokenizer.model_max_length
            for prompt, ids in zip(unseen, self.tokenizer(unseen, truncation=False).input_ids):
                if len(ids) > limit:
                    log.warning("prompt truncated to %d tokens (it has %d): %.80r…", limit, len(ids), prompt)
            self._checked.update(unseen)
            if len(self._checked) > 100_000:
                self._checked.clear()
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        device = next(self.text_encoder.parameters()).device
        output = self.text_encoder(self.tokenize(prompts).to(device))
        return {"encoder_hidden_states": output[0], "pooled_prompt_embeds": output[1]}

    def forward(self, prompts: Sequence[str]) -> Conditioning:
        """The conditioning of ``prompts``; memoized per prompt while the encoder is frozen."""
        if self.trains:
            return self.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        if missing:
            with torch.no_grad():
                encoded = self.encode(missing)
            for index, prompt in enumerate(missing):
                self._memo[prompt] = {k: v[index] for k, v in encoded.items()}
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        for prompt in prompts:
            self._memo.move_to_end(prompt)
        return {k: torch.stack([self._memo[p][k] for p in prompts]) for k in self._memo[prompts[0]]}

    def drop(self, prompts: Sequence[str], generator: Randomness) -> list[str]:
        """Replace prompts by the null prompt with probability ``drop_prob`` (classifier-free guidance)."""
        keep = draw(generator, len(prompts), lambda n, g: torch.rand(n, generator=g)) >= self.drop_prob
        return [p if k else NULL_PROMPT for p, k in zip(prompts, keep.tolist())]

    def from_batch(self, batch: dict[str, Any], prompts: Sequence[str]) -> Conditioning:
        """The conditioning of ``prompts``, from a cached batch (stored outputs and the null prompt's) or computed."""
        if "encoder_hidden_states" not in batch:
            return self(prompts)
        if self.trains:
            raise ValueError("data.cache holds frozen text-encoder outputs, but the text encoder trains "
                             "(model.components.conditioner.train_text_encoder / LoRA on it): set data.cache=null")
        dropped = torch.tensor([p == NULL_PROMPT for p in prompts])
        conditioning = {}
        for key in self.output_keys(batch):
            value, null = batch[key], batch[f"null_{key}"]
            mask = dropped.to(value.device).view((-1,) + (1,) * (value.ndim - 1))
            conditioning[key] = torch.where(mask, null, value)
        return conditioning

    @staticmethod
    def output_keys(batch: dict[str, Any]) -> list[str]:
        return [k for k in ("encoder_hidden_states", "pooled_prompt_embeds") if k in batch]

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "text_encoder_config": self.text_encoder.config.to_dict(),
                "train_text_encoder": self.train_text_encoder, "drop_prob": self.drop_prob}
