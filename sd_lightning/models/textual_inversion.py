"""Textual inversion (Gal et al. 2022): a new placeholder token whose embedding row is the only weight that trains.

The token is added to every CLIP tokenizer of the conditioner (SDXL's and SD 3's both) and its row initialized from
a given word's. The row lives in its own parameter beside the frozen matrix (``PlaceholderEmbedding``), so the
other rows cannot change — not through weight decay, EMA or rounding — while the module still saves and loads as
one plain ``weight`` of the enlarged vocabulary, which plain transformers / diffusers read. The export is the
embedding file ``pipe.load_textual_inversion(file, token=…)`` reads (SDXL: ``clip_l`` / ``clip_g``, per encoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sd_lightning.models.conditioners import is_clip

EMBEDDINGS_FILE = "learned_embeds.safetensors"
# The keys of an SDXL embedding file (AUTOMATIC1111's and diffusers' convention), per text encoder.
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class PlaceholderEmbedding(torch.nn.Module):
    """A token embedding of ``frozen`` rows that cannot change plus ``added`` trainable rows appended after them."""

    def __init__(self, frozen: torch.Tensor, added: torch.Tensor, token: str) -> None:
        super().__init__()
        self.token = token
        self.register_buffer("frozen", frozen.detach(), persistent=False)
        self.added = torch.nn.Parameter(added.detach().clone())
        self.num_frozen = int(frozen.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.added])

    @property
    def num_embeddings(self) -> int:
        return self.num_frozen + int(self.added.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids.clamp(max=self.num_frozen - 1), self.frozen)
        new = ids >= self.num_frozen
        added = F.embedding((ids - self.num_frozen).clamp(min=0), self.added)
        return torch.where(new[..., None], added, out)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if tuple(weight.shape) != (self.num_embeddings, self.frozen.shape[1]):
            error_msgs.append(f"{key}: shape {tuple(weight.shape)}, expected {(self.num_embeddings, self.frozen.shape[1])}")
            return
        with torch.no_grad():
            self.frozen.copy_(weight[: self.num_frozen])
            self.added.copy_(weight[self.num_frozen:])


@dataclass
class TextualInversion:
    """``placeholder_token`` (e.g. ``<my-cat>``, new to the tokenizers) starts as ``initializer_token``'s embedding."""

    placeholder_token: str = "<concept>"
    initializer_token: str = "object"

    def __post_init__(self) -> None:
        if not self.placeholder_token.strip() or " " in self.placeholder_token.strip():
            raise ValueError(f"model.components.textual_inversion.placeholder_token={self.placeholder_token!r} must "
                             "be one word without spaces, e.g. <my-cat>")
        self.placeholder_token = self.placeholder_token.strip()

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def _clip_parts(conditioner: Any) -> list[tuple[str, Any, Any]]:
    """(encoder name, tokenizer, encoder) of each CLIP encoder (SD 3's T5 keeps its vocabulary)."""
    return [(e, getattr(conditioner, t), getattr(conditioner, e)) for t, e in conditioner.present_parts()
            if is_clip(getattr(conditioner, e))]


def inject_textual_inversion(conditioner: Any, spec: TextualInversion) -> None:
    """Add the token to every CLIP tokenizer and its trainable row to every CLIP encoder; the rest stays frozen."""
    for name, tokenizer, encoder in _clip_parts(conditioner):
        vocab = tokenizer.get_vocab()
        if spec.placeholder_token in vocab or f"{spec.placeholder_token}</w>" in vocab:  # </w>: CLIP's word end
            raise ValueError(f"model.components.textual_inversion.placeholder_token={spec.placeholder_token!r} is "
                             f"already a token of the {name} tokenizer: choose a new word, e.g. <{spec.placeholder_token}>")
        init = tokenizer.encode(spec.initializer_token, add_special_tokens=False)
        if len(init) != 1:
            raise ValueError(f"model.components.textual_inversion.initializer_token={spec.initializer_token!r} is "
                             f"{len(init)} tokens for the {name} tokenizer; use a single-token word (e.g. dog)")
        embedding = encoder.get_input_embeddings()
        if embedding.num_embeddings != len(tokenizer):
            raise ValueError(f"{name}: the embedding has {embedding.num_embeddings} rows for {len(tokenizer)} tokens")
        tokenizer.add_tokens([spec.placeholder_token])
        wrap(encoder, embedding.weight.detach(), embedding.weight.detach()[init], spec.placeholder_token)


def wrap(encoder: Any, frozen: torch.Tensor, added: torch.Tensor, token: str) -> None:
    encoder.set_input_embeddings(PlaceholderEmbedding(frozen, added, token))
    encoder.config.vocab_size = int(frozen.shape[0] + added.shape[0])


def rewrap(conditioner: Any, record: dict[str, Any]) -> None:
    """A checkpoint's plain (enlarged) embeddings split again at the recorded rows, so EMA and resume find the
    trained rows under the names they were trained with."""
    for name, _, encoder in _clip_parts(conditioner):
        weight = encoder.get_input_embeddings().weight.detach()
        rows = int(record["frozen_rows"][name])
        wrap(encoder, weight[:rows].clone(), weight[rows:], record["placeholder_token"])


def frozen_rows(conditioner: Any) -> dict[str, int]:
    return {name: encoder.get_input_embeddings().num_frozen for name, _, encoder in _clip_parts(conditioner)}


def placeholder_encoders(encoders: dict[str, Any]) -> dict[str, PlaceholderEmbedding]:
    """The placeholder embeddings of these encoders (a pipeline's ``text_encoder``, ``text_encoder_2``, …)."""
    found = {name: e.get_input_embeddings() for name, e in encoders.items() if e is not None}
    return {name: m for name, m in found.items() if isinstance(m, PlaceholderEmbedding)}


def save_embeddings(file: str | Path, encoders: dict[str, Any]) -> Path:
    """The learned row: ``{"emb_params": [1, D]}`` for one encoder, ``{"clip_l": …, "clip_g": …}`` for two (SDXL)."""
    rows = {name: m.added.detach().float().contiguous() for name, m in placeholder_encoders(encoders).items()}
    state = {"emb_params": rows["text_encoder"]} if len(rows) == 1 else {ENCODER_KEYS[n]: r for n, r in rows.items()}
    save_file(state, str(file))
    return Path(file)
