"""The tiny text encoder's offline tokenizer."""

import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from sd_lightning.data.sources import digit_caption
from sd_lightning.models.tokenizer import TINY_TOKENIZER_DIR, build_tiny_tokenizer, load_tiny_tokenizer


def test_clip_conventions_and_padding():
    tok = load_tiny_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a handwritten digit seven", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    end = ids.index(tok.eos_token_id)
    assert end > 1 and all(i == tok.pad_token_id == tok.eos_token_id for i in ids[end:])


def test_digit_prompts_are_distinct_and_long_captions_truncate():
    tok = load_tiny_tokenizer()
    sequences = {tuple(tok(digit_caption(k)).input_ids) for k in range(10)}
    assert len(sequences) == 10
    long = tok(" ".join(["word"] * 500), truncation=True, max_length=77).input_ids
    assert len(long) == 77


def test_any_text_round_trips():
    tok = load_tiny_tokenizer()
    for text in ["héllo wörld", "emoji 🌍🎨", "tab\tand\x07bell", "日本語のキャプション"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text.lower()


def test_rebuild_is_byte_identical(tmp_path):
    build_tiny_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()


def test_works_with_a_clip_text_encoder_and_reloads(tmp_path):
    tok = load_tiny_tokenizer()
    batch = tok(["a red cat", ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt")
    assert batch.input_ids.shape == (2, 77) and "attention_mask" in batch
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id))
    hidden = encoder(batch.input_ids).last_hidden_state
    assert hidden.shape == (2, 77, 32) and torch.isfinite(hidden).all()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again("a red cat").input_ids == tok("a red cat").input_ids
