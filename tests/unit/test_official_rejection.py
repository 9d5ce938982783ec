"""Classifier-rejection sampling (ctm_core.eval.rejection) and the ADM classifier (ctm_core.nets.official.adm).

The selection rule is checked against an independent transcription of sony/ctm classifier_rejection.py's second
pass (dicts of class -> {index: log-prob} in insertion order, a stable reverse sort, whole files appended from the
last); the σ -> (VP mean, cosine time) map against its defining identities; the classifier's score against a direct
log-softmax; the attention layouts against per-head loops written from the official reshapes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctm_core.eval.rejection import (
    build_adm_classifier,
    classifier_log_probs,
    load_adm_classifier,
    pool_size,
    select_rejection,
    to_official_uint8,
    vp_classifier_time,
)
from ctm_core.nets.official.adm import _qkv_attention

TINY = dict(image_size=16, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8", num_classes=5)
TINY["channel_mult"] = "1,2"


def _official_selection(log_probs, labels, num_classes, ratio, per_class, file_size, num_out):
    """classifier_rejection.py's selection, transcribed with its own data structures."""
    log_probs_all = {k: {i: log_probs[i] for i in range(len(log_probs)) if labels[i] == k} for k in range(num_classes)}
    samples_per_class = int((1.0 + ratio) * per_class)
    top = []
    for k in range(num_classes):
        first = dict(list(log_probs_all[k].items())[:samples_per_class])
        top.extend(list(dict(sorted(first.items(), key=lambda item: item[1], reverse=True)).keys())[:per_class])
    files = [list(range(s, min(s + file_size, len(labels)))) for s in range(0, len(labels), file_size)]
    kept, num = [], 0
    for f in files:
        kept.extend([i for i in top if num <= i < num + len(f)])
        num += len(f)
    n = 1
    while len(kept) < num_out:
        kept.extend(files[-n])
        n += 1
    return kept[:num_out]


@pytest.mark.parametrize("num_classes, num_out, ratio, file_size, seed", [(4, 40, 0.5, 7, 0), (3, 30, 0.2, 5, 1)])
def test_selection_matches_the_official_rule(num_classes, num_out, ratio, file_size, seed):
    rng = np.random.default_rng(seed)
    P = pool_size(num_out, ratio)
    labels = rng.integers(0, num_classes, P)
    labels[: P // 3] = 0  # an over-represented class and short ones: top-up happens
    log_probs = np.round(rng.normal(size=P), 1)  # ties
    got = select_rejection(log_probs, labels, num_classes=num_classes, num_out=num_out, ratio=ratio, chunk=file_size)
    ref = _official_selection(log_probs.tolist(), labels.tolist(), num_classes, ratio, num_out // num_classes,
                              file_size, num_out)  # fmt: skip
    assert sorted(got.tolist()) == sorted(ref)
    assert len(got) == num_out


def test_selection_keeps_the_best_of_each_class_without_top_up():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    log_probs = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.7, 0.1, 0.0, 0.95])
    # 2 per class out of the first int(1.5·2) = 3 of each class: class 0 {0, 2, 4} -> 2, 4; class 1 {1, 3, 5} -> 1, 5
    got = select_rejection(log_probs, labels, num_classes=2, num_out=4, ratio=0.5, chunk=10)
    assert got.tolist() == [1, 2, 4, 5]


def test_vp_time_identities():
    """τ makes the VP marginal equal the VE one (α² = 1/(1+σ²)); t_cos is the cosine-schedule time of that α."""
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0], dtype=torch.float64)
    alpha, t_cos = vp_classifier_time(sigma)
    torch.testing.assert_close(alpha, 1 / (1 + sigma**2).sqrt(), rtol=1e-12, atol=0)
    s = 0.008
    f = torch.cos((t_cos + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(f, alpha**2, rtol=1e-10, atol=1e-12)
    assert 0 < float(t_cos[0]) < 1e-3 and bool((t_cos[1:] > t_cos[:-1]).all())
    _, tau = vp_classifier_time(sigma, cosine_time=False)
    d = 20.0 - 0.1
    torch.testing.assert_close(0.5 * tau**2 * d + 0.1 * tau, torch.log1p(sigma**2), rtol=1e-12, atol=1e-15)


def _loop_attention(qkv, heads, order):
    """Per-head attention from the official reshapes: sony/ctm 'b (three h d) s', guided-diffusion legacy
    'reshape(b*h, 3*d, s).split(d)'."""
    B, width, N = qkv.shape
    d = width // (3 * heads)
    out = torch.zeros(B, heads * d, N, dtype=qkv.dtype)
    for b in range(B):
        for h in range(heads):
            if order == "three_heads":
                q, k, v = (qkv[b, j * heads * d + h * d : j * heads * d + (h + 1) * d] for j in range(3))
            else:
                base = h * 3 * d
                q, k, v = (qkv[b, base + j * d : base + (j + 1) * d] for j in range(3))
            w = torch.softmax((q.T @ k) / math.sqrt(d), dim=-1)  # (N, N)
            out[b, h * d : (h + 1) * d] = v @ w.T
    return out


@pytest.mark.parametrize("order", ["three_heads", "heads_three"])
def test_attention_layouts(order):
    qkv = torch.randn(2, 3 * 2 * 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(_qkv_attention(qkv, 2, order), _loop_attention(qkv, 2, order))


@torch.no_grad()
def test_classifier_roundtrip_and_log_probs(tmp_path, save_like_official):
    torch.manual_seed(0)
    net = build_adm_classifier(**TINY).eval()
    for p in net.parameters():
        p.add_(0.05 * torch.randn_like(p))
    keys = list(net.state_dict())
    assert keys[0] == "time_embed.0.weight" and "out.2.positional_embedding" in keys
    assert tuple(net.state_dict()["input_blocks.3.1.qkv.weight"].shape) == (192, 64, 1)  # conv_nd(1, ...): 3-D
    path = tmp_path / "classifier.pt"
    save_like_official(net.state_dict(), path)
    loaded = load_adm_classifier(path, **TINY)

    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    u8 = to_official_uint8(x)
    assert torch.equal(u8, ((x + 1) * 127.5).clamp(0, 255).floor().to(torch.uint8))  # truncation, no rounding
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    got = classifier_log_probs(loaded, u8, labels, sigma=0.002, batch=4)
    alpha = 1 / math.sqrt(1 + 0.002**2)
    s = 0.008
    t = (1 + s) * 2 / math.pi * math.acos(math.cos(s / (1 + s) * math.pi / 2) * alpha) - s
    logits = net(alpha * (u8.float() / 127.5 - 1), torch.full((6,), t))
    ref = torch.log_softmax(logits, -1)[torch.arange(6), labels]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_classifier_bad_input(tmp_path):
    net = build_adm_classifier(**TINY)
    path = tmp_path / "classifier.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ValueError, match=r"first mismatching key time_embed.0.weight: checkpoint \[128, 32\]"):
        load_adm_classifier(path, **{**TINY, "classifier_width": 64})
    with pytest.raises(ValueError, match="unknown classifier flags"):
        build_adm_classifier(width=3)
    with pytest.raises(ValueError, match="expected 64x64 images"):
        build_adm_classifier(**{**TINY, "image_size": 64})(torch.zeros(1, 3, 16, 16), torch.zeros(1))


@torch.no_grad()
def test_rejection_sample_end_to_end_on_tiny_random_weights():
    """A tiny official-layout student and classifier: the kept samples are pool samples whose per-class scores beat
    the rejected candidates of their class, recomputed here from the pool."""
    from ctm_core.diffusion.samplers import StackedRandomGenerator, gamma_sampler
    from ctm_core.eval.rejection import rejection_sample
    from ctm_core.nets.official.loader import build_official_ctm

    torch.manual_seed(0)
    student = build_official_ctm(
        "sony-ctm-imagenet64", image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="8", num_head_channels=16, num_classes=5,
    ).eval()  # fmt: skip
    classifier = build_adm_classifier(**TINY).eval()
    for p in [*student.parameters(), *classifier.parameters()]:
        p.add_(0.05 * torch.randn_like(p))
    seeds = list(range(100, 130))
    x, y, keep = rejection_sample(student, classifier, seeds, num_out=20, ratio=0.5, img_shape=(3, 16, 16), batch=8)
    assert x.shape == (20, 3, 16, 16) and len(keep) == 20 and pool_size(20, 0.5) == 30

    pool, labels = [], []
    for i in range(0, 30, 8):  # the pool: per-seed latents then labels, in the same batches (CPU conv rounding)
        rnd = StackedRandomGenerator("cpu", seeds[i : i + 8])
        latents, y_i = rnd.randn([len(rnd), 3, 16, 16]), rnd.randint(5, [len(rnd)])
        pool.append(gamma_sampler(student, latents, torch.eye(5)[y_i], nfe=1))
        labels.append(y_i)
    pool, labels = torch.cat(pool), torch.cat(labels)
    assert torch.equal(x, pool[keep])
    assert torch.equal(y, labels[keep])
    scores = classifier_log_probs(classifier, to_official_uint8(pool), labels)
    ref = _official_selection(scores.tolist(), labels.tolist(), 5, 0.5, 4, 8, 20)
    assert sorted(keep.tolist()) == sorted(ref)
