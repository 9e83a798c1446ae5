"""FID/KID with the data-trained feature network, its cache, class-conditional judging and reconstruction metrics.

Values are checked against hand computations (numpy/scipy on the same features), and against what
real-vs-real and real-vs-noise comparisons must give.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch

from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.sources import DigitsSource
from sd_lightning.evaluation import features as features_module
from sd_lightning.evaluation.features import (
    FeatureNetwork,
    LabeledImages,
    class_labels,
    load_split_images,
    trained_feature_network,
)
from sd_lightning.evaluation.image_metrics import (
    FeatureClassifierJudge,
    class_conditional_metrics,
    clip_score,
    frechet_distance,
    kernel_distance,
    reconstruction_metrics,
)
from sd_lightning.models.builders import build_vae


@pytest.fixture(scope="module")
def digits() -> LabeledImages:
    return load_split_images(DiffusionDataModule(DigitsSource(size=32), resolution=32, val_fraction=0.1))


@pytest.fixture(scope="module")
def feature_net(digits, tmp_path_factory):
    """The default feature network trained on the digits' train split (about 10-30 s on 2 CPU threads)."""
    return trained_feature_network(digits, cache_dir=tmp_path_factory.mktemp("feature-cache"))


def _features(net, images):
    with torch.no_grad():
        return net(images).double().numpy()


def _hand_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def _hand_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³ on all of both sets."""
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@pytest.mark.slow  # shares the feature network trained once on all digits (20-100 s here, by CPU load)
def test_classifier_reaches_high_validation_accuracy(feature_net, digits):
    assert feature_net.class_names is not None and len(feature_net.class_names) == 10
    assert feature_net.objective == "classifier"
    assert feature_net.metrics["val_accuracy"] > 0.95
    assert feature_net.network(digits.val[:5]).shape == (5, feature_net.network.num_features)


@pytest.mark.slow  # shares the feature network trained once on all digits (20-100 s here, by CPU load)
def test_fid_matches_hand_computation_and_orders_real_vs_noise(feature_net, digits):
    net = feature_net.network
    real = digits.train
    half_a, half_b = real[0::2][:400], real[1::2][:400]
    noise = torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    assert abs(frechet_distance(net, half_a, half_a)) < 1e-3
    halves = frechet_distance(net, half_a, half_b)
    to_noise = frechet_distance(net, half_a, noise)
    assert halves == pytest.approx(_hand_fid(_features(net, half_a), _features(net, half_b)), rel=1e-3, abs=1e-3)
    assert to_noise == pytest.approx(_hand_fid(_features(net, half_a), _features(net, noise)), rel=1e-3)
    assert to_noise > 20 * halves


@pytest.mark.slow  # shares the feature network trained once on all digits (20-100 s here, by CPU load)
def test_kid_matches_hand_computation_and_orders_real_vs_noise(feature_net, digits):
    net = feature_net.network
    half_a, half_b = digits.train[0::2][:300], digits.train[1::2][:300]
    noise = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # One subset holding every image: KID is then exactly the unbiased MMD² of the two sets.
    exact, _ = kernel_distance(net, half_a, half_b, subsets=1, subset_size=300)
    assert exact == pytest.approx(_hand_kid(_features(net, half_a), _features(net, half_b)), rel=1e-4, abs=1e-6)
    same, _ = kernel_distance(net, half_a, half_a, subsets=1, subset_size=300)
    noisy, _ = kernel_distance(net, half_a, noise, subsets=20, subset_size=100)
    halves, _ = kernel_distance(net, half_a, half_b, subsets=20, subset_size=100)
    # Against itself the unbiased estimator is slightly negative (it leaves the diagonal out of the within-set
    # means only): about 0 on the scale of a real difference.
    assert same == pytest.approx(_hand_kid(_features(net, half_a), _features(net, half_a)), rel=1e-4)
    assert abs(same) < 0.05 * noisy
    assert noisy > 20 * abs(halves)
    # Subsets are drawn from a seeded generator: repeatable.
    assert kernel_distance(net, half_a, half_b, subsets=5, subset_size=50, seed=3) == \
        kernel_distance(net, half_a, half_b, subsets=5, subset_size=50, seed=3)


@pytest.mark.slow  # shares the feature network trained once on all digits (20-100 s here, by CPU load)
def test_conditional_accuracy_on_real_images_equals_classifier_accuracy(feature_net, digits):
    names = feature_net.class_names
    val_labels = np.array([names.index(c) for c in digits.val_captions])
    train_labels = np.array([names.index(c) for c in digits.train_captions])
    val_by_class = {k: digits.val[val_labels == k] for k in range(len(names))}
    train_by_class = {k: digits.train[train_labels == k] for k in range(len(names))}
    judge = FeatureClassifierJudge(feature_net.network, digits.val.shape[1:])
    result = class_conditional_metrics(judge, val_by_class, train_by_class)
    assert result["accuracy"] == pytest.approx(feature_net.metrics["val_accuracy"], abs=1e-6)
    assert 0.8 < result["diversity"] < 1.2  # held-out real digits are about as varied as the training ones
    collapsed = {k: v[:1].repeat(4, 1, 1, 1) for k, v in val_by_class.items()}
    assert class_conditional_metrics(judge, collapsed, train_by_class)["diversity"] == 0.0


def test_cache_hit_skips_training_and_any_change_retrains(tmp_path, digits, monkeypatch):
    calls = []
    real_train = features_module.train_feature_network

    def counting(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(features_module, "train_feature_network", counting)
    small = LabeledImages(digits.train[:96], digits.val[:32], digits.train_captions[:96], digits.val_captions[:32], "small")
    first = trained_feature_network(small, cache_dir=tmp_path, epochs=1)
    record_file = first.weights_path.with_suffix(".json")
    stamps = (first.weights_path.stat().st_mtime_ns, record_file.stat().st_mtime_ns)
    again = trained_feature_network(small, cache_dir=tmp_path, epochs=1)
    assert (first.from_cache, again.from_cache, len(calls)) == (False, True, 1)
    assert (first.weights_path.stat().st_mtime_ns, record_file.stat().st_mtime_ns) == stamps
    assert json.loads(record_file.read_text())["key"] == first.key
    for name, param in first.network.state_dict().items():
        assert torch.equal(param, again.network.state_dict()[name])
    # Other pixels (same shapes and captions) or other training settings: a new key and a new network.
    changed = LabeledImages(small.train.clone(), small.val, small.train_captions, small.val_captions, "small")
    changed.train[0, :, 0, 0] = 1.0 - changed.train[0, :, 0, 0]
    assert trained_feature_network(changed, cache_dir=tmp_path, epochs=1).key != first.key
    assert trained_feature_network(small, cache_dir=tmp_path, epochs=2).key != first.key
    assert len(calls) == 3
    # A record that does not match its file name (tampered or stale) is not trusted: retrain and rewrite.
    record_file.write_text(json.dumps({**json.loads(record_file.read_text()), "key": "other"}))
    rebuilt = trained_feature_network(small, cache_dir=tmp_path, epochs=1)
    assert not rebuilt.from_cache and len(calls) == 4
    assert json.loads(record_file.read_text())["key"] == first.key


def test_unlabeled_data_gets_autoencoder_features_or_a_clear_error(tmp_path, digits):
    captions = [f"photo number {i}" for i in range(64)]  # free text: no caption is shared
    assert class_labels(captions) is None
    assert class_labels(["cat", "dog", None, "dog"]) is None
    assert class_labels(["cat", "dog", "cat", "dog"]) == ["cat", "dog"]
    unlabeled = LabeledImages(digits.train[:64], digits.val[:16], captions, [None] * 16, "unlabeled")
    with pytest.raises(ValueError, match="feature.objective=classifier needs labeled data"):
        trained_feature_network(unlabeled, cache_dir=tmp_path, objective="classifier", epochs=1)
    auto = trained_feature_network(unlabeled, cache_dir=tmp_path, epochs=2)
    assert auto.objective == "autoencoder" and auto.class_names is None
    assert 0.0 < auto.metrics["val_mse"] < 1.0
    feats = auto.network(digits.val[:8])
    assert feats.shape == (8, 64) and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match="no classes"):
        auto.network.logits(digits.val[:2])
    with pytest.raises(ValueError, match="feature.objective"):
        trained_feature_network(unlabeled, cache_dir=tmp_path, objective="simclr")


def test_feature_network_accepts_gray_rgba_and_other_sizes():
    net = FeatureNetwork(num_classes=3).eval()
    for shape in ((2, 1, 28, 28), (2, 3, 64, 48), (2, 4, 16, 16)):
        assert net(torch.rand(shape)).shape == (2, 64)
    with pytest.raises(ValueError, match="channels"):
        net(torch.rand(2, 2, 16, 16))


def test_reconstruction_metrics_match_hand_computation(digits):
    torch.manual_seed(0)
    vae = build_vae().eval()
    images = digits.val[:16]
    result = reconstruction_metrics(vae, images, batch_size=5)
    with torch.no_grad():
        target = images.double() * 2 - 1
        rec = vae.decode(vae.encode(target.float()).latent_dist.mode()).sample.clamp(-1, 1).double()
    mse = float(((rec - target) ** 2).mean())
    assert result["mse"] == pytest.approx(mse, rel=1e-5)
    assert result["psnr"] == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-5)
    assert -1.0 <= result["ssim"] < 0.9  # an untrained VAE reproduces little structure
    assert reconstruction_metrics(_IdentityVAE(), images)["ssim"] == pytest.approx(1.0, abs=1e-6)


class _IdentityVAE(torch.nn.Module):
    """A perfect autoencoder: SSIM 1 and infinite PSNR by definition."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return type("Out", (), {"latent_dist": type("Dist", (), {"mode": lambda _self: x})()})()

    def decode(self, z):
        return type("Out", (), {"sample": z})()


def test_autoencoder_module_validates_ssim():
    from sd_lightning.models.autoencoder import AutoencoderModule

    torch.manual_seed(0)
    module = AutoencoderModule(vae=build_vae(), optimizer=torch.optim.AdamW)
    datamodule = DiffusionDataModule(DigitsSource(size=32, limit=64), val_fraction=0.5, val_batch_size=32)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert {"val/mse", "val/psnr", "val/ssim"} <= set(metrics)
    assert -1.0 <= metrics["val/ssim"] <= 1.0


def test_clip_score_is_optional():
    images = torch.rand(2, 3, 32, 32)
    assert clip_score(images, ["a cat", "a dog"], None) is None
    with pytest.raises(FileNotFoundError, match="eval.clip_path"):
        clip_score(images, ["a cat", "a dog"], "/nonexistent/clip")


def test_clip_score_with_a_local_folder_matches_hand_computation(tmp_path):
    """A tiny random CLIP saved offline: CLIPScore = mean of 100·max(cos(image, text), 0) over prompted images."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sd_lightning.models.builders import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten digit one", "", "a handwritten digit two"]  # the unprompted image is left out
    score = clip_score(images, prompts, str(tmp_path))
    kept = [0, 2]
    uint8 = (images[kept] * 255).round().to(torch.uint8)
    with torch.no_grad():
        pixels = processor(images=list(uint8), return_tensors="pt")["pixel_values"]
        tokens = processor(text=[prompts[i] for i in kept], return_tensors="pt", padding=True)
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output
        text_emb = model.get_text_features(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb)
    assert score == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)
    assert clip_score(images, ["", "", ""], str(tmp_path)) is None
