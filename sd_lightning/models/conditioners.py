"""Conditioners: prompts → the ``conditioning`` dict a denoiser takes; they own the null condition and its dropout.

A conditioner tokenizes (warning once per prompt that is cut), runs its text encoders, memoizes the outputs of
frozen encoders per prompt, and returns what its family's diffusers pipeline computes from a prompt:
``encoder_hidden_states`` [B, L, D] and ``pooled_prompt_embeds`` [B, P] (SD 1.x/2.x: one CLIP; SDXL: two CLIPs'
penultimate states side by side, the second's projection pooled; SD 3: CLIP-L + CLIP-G, optionally T5). SDXL
adds ``micro_conditioning`` [B, 6] (original size, crop top-left, target size) from the batch. Classifier-free
guidance trains the null condition, the empty prompt, with probability ``drop_prob``. The encoder and tokenizer
attributes carry the pipeline's component names (``text_encoder_2``, ``tokenizer_2``, …).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sd_lightning.diffusion.noise import Randomness, draw

log = logging.getLogger(__name__)

Conditioning = dict[str, torch.Tensor]
NULL_PROMPT = ""


def is_clip(encoder: Any) -> bool:
    """A CLIP text encoder (with or without projection), as opposed to SD 3's T5: what adapters and placeholder
    tokens attach to."""
    return type(encoder).__name__.startswith("CLIP")


class TextConditioner(torch.nn.Module):
    """One CLIP text encoder (SD 1.x/2.x): its last hidden states, and the pooled (EOS) embedding."""

    kind = "clip"
    # (tokenizer, text encoder) attribute pairs, named as the family's pipeline names its components.
    parts: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    optional_parts: tuple[tuple[str, str], ...] = ()

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, drop_prob: float = 0.1,
                 train_text_encoder: bool = False, memo_size: int = 1024, tokenizer_source: str = "tiny",
                 **parts: Any) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"model.components.conditioner.drop_prob must be in [0, 1], got {drop_prob}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        for tokenizer_name, encoder_name in (*self.parts[1:], *self.optional_parts):
            setattr(self, tokenizer_name, parts.pop(tokenizer_name, None))
            setattr(self, encoder_name, parts.pop(encoder_name, None))
        if parts:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(parts)}")
        self.tokenizer_source = tokenizer_source
        self.drop_prob = drop_prob
        self.train_text_encoder = train_text_encoder
        self.memo_size = memo_size
        self._memo: OrderedDict[str, Conditioning] = OrderedDict()
        self._checked: set[str] = set()

    # ------------------------------------------------------------------------------------- components
    def present_parts(self) -> list[tuple[str, str]]:
        return [(t, e) for t, e in (*self.parts, *self.optional_parts) if getattr(self, e, None) is not None]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, e) for _, e in self.present_parts()]

    @property
    def tokenizers(self) -> list[PreTrainedTokenizerBase]:
        return [getattr(self, t) for t, _ in self.present_parts()]

    @classmethod
    def part_names(cls) -> list[str]:
        """Every tokenizer and text-encoder attribute (required, then optional), as the pipeline names them."""
        return [name for pair in (*cls.parts, *cls.optional_parts) for name in pair]

    @classmethod
    def encoder_names(cls) -> list[str]:
        return [encoder for _, encoder in (*cls.parts, *cls.optional_parts)]

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline keyword arguments of this conditioner: its tokenizers and encoders (absent ones: None)."""
        return {name: getattr(self, name, None) for name in self.part_names()}

    @classmethod
    def from_pipeline(cls, pipeline: Any, **options: Any) -> TextConditioner:
        parts = {name: getattr(pipeline, name, None) for name in cls.part_names()}
        return cls(**parts, **cls.pipeline_options(pipeline), **options)

    @classmethod
    def pipeline_options(cls, pipeline: Any) -> dict[str, Any]:
        """Settings a pipeline's other components fix for this conditioner (SD 3: the joint attention width)."""
        return {}

    @property
    def sequence_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def pooled_dim(self) -> int | None:
        return int(self.text_encoder.config.hidden_size)

    @property
    def trains(self) -> bool:
        """Whether any encoder weight trains (fully, or through adapters): then nothing is memoized or cached."""
        return any(p.requires_grad for p in self.parameters())

    def freeze(self) -> None:
        for encoder in self.text_encoders:
            encoder.requires_grad_(self.train_text_encoder)
            encoder.train(self.train_text_encoder and self.training)

    def train(self, mode: bool = True) -> TextConditioner:
        super().train(mode)
        trains = self.trains
        for encoder in self.text_encoders:
            encoder.train(mode and trains)
        return self

    # ------------------------------------------------------------------------------------- encoding
    def tokenize(self, prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase | None = None,
                 max_length: int | None = None) -> torch.Tensor:
        """Token ids padded to the encoder's length; prompts longer than that are cut with a warning (once each)."""
        tokenizer = tokenizer or self.tokenizer
        limit = max_length or tokenizer.model_max_length
        if tokenizer is self.tokenizer:
            unseen = [p for p in dict.fromkeys(prompts) if p not in self._checked]
            if unseen:
                for prompt, ids in zip(unseen, tokenizer(unseen, truncation=False).input_ids):
                    if len(ids) > limit:
                        log.warning("prompt truncated to %d tokens (it has %d): %.80r…", limit, len(ids), prompt)
                self._checked.update(unseen)
                if len(self._checked) > 100_000:
                    self._checked.clear()
        return tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                         return_tensors="pt").input_ids

    def run(self, encoder: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
            max_length: int | None = None) -> Any:
        device = next(encoder.parameters()).device
        return encoder(self.tokenize(prompts, tokenizer, max_length).to(device))

    def run_penultimate(self, encoder: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                        prompts: Sequence[str]) -> tuple[Any, torch.Tensor]:
        """The encoder's output and its penultimate layer's states (``hidden_states[-2]``, what SDXL and SD 3 use).

        Read with a hook of our own: transformers' ``output_hidden_states`` records through a per-process registry
        of model instances that a model unpickled in a spawned process (``ddp_spawn``) is missing from."""
        captured: list[torch.Tensor] = []
        body = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps the transformer
        layer = body.encoder.layers[-2]
        handle = layer.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, (tuple, list)) else out))
        try:
            output = self.run(encoder, tokenizer, prompts)
        finally:
            handle.remove()
        return output, captured[-1]

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        output = self.run(self.text_encoder, self.tokenizer, prompts)
        return {"encoder_hidden_states": output[0], "pooled_prompt_embeds": output[1]}

    def forward(self, prompts: Sequence[str]) -> Conditioning:
        """The conditioning of ``prompts``; memoized per prompt while the encoders are frozen.

        Frozen encoders run one prompt at a time, so a prompt's states never depend on which other prompts missed
        the memo with it (a matrix product's rounding can depend on its row count): a resumed run, whose memo
        starts empty, then conditions exactly as the uninterrupted run did, and a cache build stores the same values.
        """
        if self.trains:
            return self.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        for prompt in missing:
            with torch.no_grad():
                encoded = self.encode([prompt])
            self._memo[prompt] = {k: v[0] for k, v in encoded.items()}
        if missing:
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        for prompt in prompts:
            self._memo.move_to_end(prompt)
        return {k: torch.stack([self._memo[p][k] for p in prompts]) for k in self._memo[prompts[0]]}

    def for_sampling(self, prompts: Sequence[str], height: int, width: int) -> Conditioning:
        """What a sampler passes the denoiser for images of ``height`` × ``width`` pixels."""
        return self(prompts)

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        """Arguments the family pipeline's ``__call__`` needs to encode prompts as this conditioner does."""
        return {}

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

    def options(self) -> dict[str, Any]:
        """Constructor settings besides the parts, as a checkpoint records them."""
        return {"drop_prob": self.drop_prob, "train_text_encoder": self.train_text_encoder}

    def record(self) -> dict[str, Any]:
        encoders = {e: {"class": type(getattr(self, e)).__name__, "config": getattr(self, e).config.to_dict()}
                    for _, e in self.present_parts()}
        return {"kind": self.kind, "encoders": encoders, "options": self.options()}


class SDXLConditioner(TextConditioner):
    """SDXL: CLIP ViT-L and OpenCLIP ViT-bigG, penultimate states concatenated, the second's projection pooled,
    plus the micro-conditioning ids of each image (original size, crop top-left, target size)."""

    kind = "sdxl"
    parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    def __init__(self, *args: Any, zero_null_condition: bool = False, **kwargs: Any) -> None:
        """``zero_null_condition``: the null prompt's states and pooled embedding are zeros (what SDXL base was
        trained with, its pipeline's ``force_zeros_for_empty_prompt``), else the empty prompt encoded."""
        super().__init__(*args, **kwargs)
        self.zero_null_condition = zero_null_condition

    @classmethod
    def pipeline_options(cls, pipeline: Any) -> dict[str, Any]:
        return {"zero_null_condition": bool(pipeline.config.get("force_zeros_for_empty_prompt", True))}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {**super().pipeline_kwargs(), "force_zeros_for_empty_prompt": self.zero_null_condition}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "zero_null_condition": self.zero_null_condition}

    @property
    def sequence_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        # As StableDiffusionXLPipeline.encode_prompt (clip_skip=None): hidden_states[-2] of each encoder.
        _, first = self.run_penultimate(self.text_encoder, self.tokenizer, prompts)
        second, second_states = self.run_penultimate(self.text_encoder_2, self.tokenizer_2, prompts)
        states = torch.cat([first, second_states], dim=-1)
        pooled = second.text_embeds
        if self.zero_null_condition:
            keep = torch.tensor([p != NULL_PROMPT for p in prompts], device=states.device)
            states, pooled = states * keep.view(-1, 1, 1).to(states), pooled * keep.view(-1, 1).to(pooled)
        return {"encoder_hidden_states": states, "pooled_prompt_embeds": pooled}

    def from_batch(self, batch: dict[str, Any], prompts: Sequence[str]) -> Conditioning:
        if "micro_conditioning" not in batch:
            raise KeyError("the SDXL conditioner needs each image's micro_conditioning (original size, crop, target "
                           "size) in the batch; this data module's datasets do not provide it")
        conditioning = dict(super().from_batch(batch, prompts))
        ids = batch["micro_conditioning"]
        conditioning["micro_conditioning"] = ids.to(conditioning["pooled_prompt_embeds"])
        return conditioning

    def for_sampling(self, prompts: Sequence[str], height: int, width: int) -> Conditioning:
        """The pipeline's defaults: original size = target size = the image's, no crop."""
        conditioning = dict(self(prompts))
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        conditioning["micro_conditioning"] = ids.expand(len(prompts), 6).to(conditioning["pooled_prompt_embeds"])
        return conditioning


class SD3Conditioner(TextConditioner):
    """SD 3/3.5: CLIP-L and CLIP-G penultimate states side by side, zero-padded to the joint attention width and
    followed on the sequence by T5's states — or by zeros when ``text_encoder_3`` is absent, as the pipeline does;
    pooled: both CLIP projections concatenated."""

    kind = "sd3"
    parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    optional_parts = (("tokenizer_3", "text_encoder_3"),)

    def __init__(self, *args: Any, joint_attention_dim: int | None = None, t5_sequence_length: int = 256,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        clip_width = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        if self.text_encoder_3 is not None:
            joint_attention_dim = int(self.text_encoder_3.config.d_model)
        self.joint_attention_dim = joint_attention_dim or clip_width
        if self.joint_attention_dim < clip_width:
            raise ValueError(f"model.components.conditioner.joint_attention_dim={self.joint_attention_dim} is narrower "
                             f"than the two CLIP widths together ({clip_width})")
        self.t5_sequence_length = t5_sequence_length

    @classmethod
    def pipeline_options(cls, pipeline: Any) -> dict[str, Any]:
        return {"joint_attention_dim": int(pipeline.transformer.config.joint_attention_dim)}

    @property
    def sequence_dim(self) -> int:
        return self.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder.config.projection_dim) + int(self.text_encoder_2.config.projection_dim)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        # As StableDiffusion3Pipeline.encode_prompt (clip_skip=None, max_sequence_length=t5_sequence_length).
        first, first_states = self.run_penultimate(self.text_encoder, self.tokenizer, prompts)
        second, second_states = self.run_penultimate(self.text_encoder_2, self.tokenizer_2, prompts)
        clip = torch.cat([first_states, second_states], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_attention_dim - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(prompts), self.t5_sequence_length, self.joint_attention_dim)
        else:
            t5 = self.run(self.text_encoder_3, self.tokenizer_3, prompts, self.t5_sequence_length)[0]
        pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip)], dim=-2), "pooled_prompt_embeds": pooled}

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_sequence_length}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "joint_attention_dim": self.joint_attention_dim,
                "t5_sequence_length": self.t5_sequence_length}

