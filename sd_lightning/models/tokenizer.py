"""The offline tokenizer of the tiny text encoder.

A byte-level BPE (any text, no unknown tokens) trained deterministically on a small caption corpus that
ships with the package, wrapped as a ``PreTrainedTokenizerFast`` with CLIP's conventions (bos/eos, pad =
eos, 77 positions), so it saves and loads like any Hugging Face tokenizer and works in
``StableDiffusionPipeline`` without network access. Pretrained models use their own folder's tokenizer.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_COLORS = "red green blue yellow black white gray orange purple pink brown golden silver dark light".split()
_SUBJECTS = (
    "cat dog bird horse cow sheep fish flower tree house car bicycle boat train plane person man woman child "
    "face portrait mountain river lake ocean beach forest city street building bridge road sky cloud sun moon "
    "star table chair cup bottle book phone computer clock lamp window door garden field rock snow rain fire "
    "letter number digit shape circle square triangle line pattern texture logo icon sign product shoe bag"
).split()
_STYLES = (
    "photo painting drawing sketch illustration render watercolor oil pencil cartoon pixel art close-up "
    "macro wide-angle blurry sharp detailed minimal vintage modern handwritten printed grayscale colorful"
).split()
_TEMPLATES = (
    "a {style} of a {color} {subject}",
    "a {color} {subject} on a {color2} background",
    "{number} {subject}s in the {subject2}",
    "a handwritten digit {number}",
    "a photo of a {subject} next to a {subject2}",
    "the {subject} is {color}, high quality, {style}",
    "an image of {number} {color} {subject}s",
)


def corpus_lines() -> list[str]:
    """Caption-like sentences built from fixed word lists: the same corpus on every machine."""
    lines = [f"a handwritten digit {n}" for n in _NUMBERS[:10] for _ in range(20)]
    words = itertools.cycle(itertools.product(_SUBJECTS, _COLORS, _STYLES))
    for index in range(4000):
        subject, color, style = next(words)
        lines.append(
            _TEMPLATES[index % len(_TEMPLATES)].format(
                style=style, color=color, color2=_COLORS[(index * 7) % len(_COLORS)], subject=subject,
                subject2=_SUBJECTS[(index * 11) % len(_SUBJECTS)], number=_NUMBERS[index % len(_NUMBERS)],
            )
        )
    return lines


def build_tiny_tokenizer(out_dir: Path = TINY_TOKENIZER_DIR, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and save it (byte-identical on every run)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=77, padding_side="right",
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR, local_files_only=True)


if __name__ == "__main__":
    print(f"wrote {len(build_tiny_tokenizer())} tokens to {TINY_TOKENIZER_DIR}")
