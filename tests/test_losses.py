"""Training losses: LPIPS from given weights only, Q-DOVE region losses, hinge GAN, length control."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tokenizer.modeling.length import lengths_from_eos
from tokenizer.training.discriminator import (
    PatchDiscriminator,
    adaptive_adversarial_weight,
    adversarial_weight_at,
    hinge_d_loss,
    hinge_g_loss,
)
from tokenizer.training.length_control import LengthControl, sample_training_lengths
from tokenizer.training.losses import PerceptualLoss, ReconstructionLoss, drop_queries


def random_vgg16_features(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format VGG16 `features` state dict with random values (shapes from the real model)."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in torchvision.models.vgg16().features.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.safetensors"
    features = random_vgg16_features()
    save_file(features, str(path))
    return path, features


@pytest.fixture(scope="module")
def perceptual(vgg_file):
    return PerceptualLoss(vgg_file[0])


# ---- perceptual -------------------------------------------------------------------------------------


def test_perceptual_refuses_without_weights(tmp_path):
    with pytest.raises(ValueError, match="VGG16 weights") as err:
        PerceptualLoss(None)
    assert "weight to 0" in str(err.value)
    missing = tmp_path / "nowhere" / "vgg16.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        PerceptualLoss(missing)
    assert str(missing) in str(err.value) and "weight to 0" in str(err.value)
    with pytest.raises(FileNotFoundError, match="some-org/vgg16"):  # a hub id, offline in tests
        PerceptualLoss("some-org/vgg16")
    with pytest.raises(ValueError, match="perceptual_weight=0.5"):
        ReconstructionLoss(perceptual_weight=0.5)


def test_perceptual_rejects_a_file_that_is_not_vgg16(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError, match="no VGG16 `features` weights"):
        PerceptualLoss(path)
    features = random_vgg16_features()
    features["28.weight"] = torch.zeros(512, 512, 1, 1)
    save_file(features, str(tmp_path / "bad_shape.safetensors"))
    with pytest.raises(ValueError, match="28.weight"):
        PerceptualLoss(tmp_path / "bad_shape.safetensors")


def test_perceptual_loads_the_files_weights(vgg_file, perceptual):
    _, features = vgg_file
    loaded = perceptual.backbone_state_dict()
    assert loaded.keys() == features.keys()
    for name, tensor in features.items():
        assert torch.equal(loaded[name], tensor), name
    assert all(not p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.training and not any(m.training for m in perceptual.modules())


def test_perceptual_reads_full_torchvision_checkpoints(tmp_path, vgg_file):
    _, features = vgg_file
    full = {f"features.{name}": tensor for name, tensor in features.items()}
    full["classifier.0.weight"] = torch.zeros(4, 4)
    directory = tmp_path / "vgg16_checkpoint"
    directory.mkdir()
    torch.save(full, directory / "vgg16-397923af.pth")
    loaded = PerceptualLoss(directory).backbone_state_dict()  # a directory holding one weight file
    assert torch.equal(loaded["28.weight"], features["28.weight"])


def test_perceptual_map_is_zero_for_identical_images_and_differentiable(perceptual):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    same = perceptual(images, images.clone())
    assert same.shape == (2, 1, 32, 32)
    assert same.abs().max().item() < 1e-6
    recon = (images + 0.2 * torch.randn_like(images)).clamp(0, 1).requires_grad_(True)
    distance = perceptual(recon, images)
    assert distance.mean().item() > 1e-4
    distance.mean().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


# ---- reconstruction and Q-DOVE region weighting ------------------------------------------------------


def box_mask(batch: int, size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, top : top + side, left : left + side] = 1
    return mask


def test_error_inside_the_relevant_region_costs_more():
    target = torch.full((1, 3, 16, 16), 0.5)
    relevance = box_mask(1, 16, 0, 0, 6)
    inside, outside = target.clone(), target.clone()
    inside[:, :, 1:5, 1:5] += 0.3
    outside[:, :, 10:14, 10:14] += 0.3
    for mode in ("paper", "weighted_mean"):
        loss = ReconstructionLoss(region_lambda=0.1, region_loss=mode)
        cost_inside = loss(inside, target, relevance).total
        cost_outside = loss(outside, target, relevance).total
        assert cost_inside > 5 * cost_outside > 0, mode
        assert torch.isclose(loss(inside, target).total, loss(outside, target).total), mode


def test_paper_loss_is_the_relevant_mean_plus_lambda_times_the_irrelevant_mean():
    torch.manual_seed(0)
    recon, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    relevance = box_mask(2, 16, 5, 9, 3)  # 9 of 256 pixels
    relevance[1] = 0
    relevance[1, :, 0:2, 0:4] = 1  # another small box for the second image
    squared = ((recon - target) ** 2).mean(dim=1)  # [B,H,W]
    inside = relevance[:, 0].bool()
    by_hand_rel = torch.stack([squared[b][inside[b]].mean() for b in range(2)])
    by_hand_irr = torch.stack([squared[b][~inside[b]].mean() for b in range(2)])
    terms = ReconstructionLoss(region_lambda=0.25)(recon, target, relevance)
    assert torch.allclose(terms.per_sample, by_hand_rel + 0.25 * by_hand_irr, rtol=1e-6)
    assert torch.allclose(terms.relevant_per_sample, by_hand_rel, rtol=1e-6)
    assert torch.isclose(terms.total, (by_hand_rel + 0.25 * by_hand_irr).mean(), rtol=1e-6)
    # the paper's lambda, and the loss's defaults
    default = ReconstructionLoss()
    assert default.region_loss == "paper" and default.region_lambda == 1e-10
    terms = default(recon, target, relevance)
    assert torch.allclose(terms.per_sample, by_hand_rel + 1e-10 * by_hand_irr, rtol=1e-6)


def test_with_the_papers_lambda_the_outside_of_the_box_hardly_counts():
    torch.manual_seed(0)
    target = torch.rand(1, 3, 32, 32)
    recon = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    relevance = box_mask(1, 32, 4, 20, 5)
    loss = ReconstructionLoss(region_lambda=1e-10)
    base = loss(recon, target, relevance).total
    changed = torch.where(relevance.bool(), recon, 1.0 - target)  # the worst possible outside the box
    assert (loss(changed, target, relevance).total - base).abs().item() < 1e-8
    assert (ReconstructionLoss()(changed, target).total - ReconstructionLoss()(recon, target).total) > 0.1
    worse_inside = torch.where(relevance.bool(), recon + 0.1, recon)
    assert (loss(worse_inside, target, relevance).total - base).item() > 1e-3


def test_a_question_free_image_is_wholly_relevant():
    torch.manual_seed(0)
    recon, target = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    plain_mean = ((recon - target) ** 2).mean(dim=(1, 2, 3))
    for mode in ("paper", "weighted_mean"):
        loss = ReconstructionLoss(region_loss=mode)
        for relevance in (None, torch.ones(3, 1, 16, 16)):  # no question, or a dropped one (all-ones mask)
            terms = loss(recon, target, relevance)
            assert torch.allclose(terms.per_sample, plain_mean, rtol=1e-6), mode
            assert torch.allclose(terms.relevant_per_sample, plain_mean, rtol=1e-6), mode
            assert torch.allclose(loss.length_judgement(terms, relevance), plain_mean, rtol=1e-6), mode
    # every box cropped away: the image counts as wholly relevant rather than dividing by zero
    empty = ReconstructionLoss()(recon, target, torch.zeros(3, 1, 16, 16))
    assert torch.allclose(empty.per_sample, plain_mean, rtol=1e-6)


def test_length_is_judged_by_the_boxes_own_mean():
    target = torch.full((2, 3, 20, 20), 0.5)
    relevance = box_mask(2, 20, 0, 0, 4)  # 4% of the image
    relevance[1] = 1  # the second image's question was dropped
    recon = target.clone()
    recon[:, :, 0:4, 0:4] += 0.2  # the same error inside the box for both: 0.04 per pixel there
    loss = ReconstructionLoss()
    terms = loss(recon, target, relevance)
    judged = loss.length_judgement(terms, relevance)
    assert judged[0].item() == pytest.approx(0.04, rel=1e-5)  # the box's mean, not times its 4% area
    assert judged[1].item() == pytest.approx(0.04 * 16 / 400, rel=1e-5)  # the whole image's mean
    # the alternative scales by the weighted area: a small box then looks 25x better than its pixels are
    old = ReconstructionLoss(region_lambda=0.1, region_loss="weighted_mean")
    old_judged = old.length_judgement(old(recon, target, relevance), relevance)
    assert old_judged[0].item() == pytest.approx(0.04 * 16 / 400, rel=1e-5)
    with pytest.raises(ValueError, match="region_loss"):
        ReconstructionLoss(region_loss="sum")


def test_asked_boxes_are_measured_without_changing_the_loss():
    torch.manual_seed(0)
    recon, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    asked = box_mask(2, 16, 3, 3, 4)  # the question's boxes; its question was dropped, so all is relevant
    loss = ReconstructionLoss()
    plain = loss(recon, target, torch.ones(2, 1, 16, 16))
    measured = loss(recon, target, torch.ones(2, 1, 16, 16), asked=asked)
    assert plain.asked_per_sample is None
    assert torch.equal(measured.per_sample, plain.per_sample)
    squared = ((recon - target) ** 2).mean(dim=1)
    by_hand = torch.stack([squared[b, 3:7, 3:7].mean() for b in range(2)])
    assert torch.allclose(measured.asked_per_sample, by_hand, rtol=1e-6)


def test_weighted_mean_reduces_to_plain_loss():
    torch.manual_seed(0)
    recon, target = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    relevance = box_mask(3, 16, 2, 3, 7)
    plain = ReconstructionLoss()(recon, target)
    assert torch.allclose(plain.total, torch.mean((recon - target) ** 2))
    weighted = {"region_loss": "weighted_mean"}
    full = ReconstructionLoss(region_lambda=1.0, **weighted)(recon, target, relevance)
    assert torch.allclose(full.per_sample, plain.per_sample)
    # a uniform error costs the same with any mask: the normalisation keeps the scale of the plain loss
    uniform = ReconstructionLoss(region_lambda=0.1, **weighted)(target + 0.1, target, relevance)
    assert torch.allclose(uniform.per_sample, torch.full((3,), 0.01), atol=1e-6)
    # a mask at a coarser resolution is resized, and lambda 0 with an empty mask falls back to the plain mean
    coarse = ReconstructionLoss(**weighted)(recon, target, relevance[:, :, ::2, ::2])
    assert coarse.per_sample.shape == (3,)
    empty = ReconstructionLoss(region_lambda=0.0, **weighted)(recon, target, torch.zeros(3, 1, 16, 16))
    assert torch.allclose(empty.per_sample, plain.per_sample)


def test_reconstruction_terms_combine_mse_and_perceptual(perceptual):
    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32)
    recon = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    relevance = box_mask(2, 32, 4, 4, 12)
    loss = ReconstructionLoss(mse_weight=1.0, perceptual_weight=0.5, perceptual=perceptual, region_lambda=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(recon, target, relevance)
    assert terms.total.dtype == torch.float32
    assert terms.per_sample.shape == (2,)
    assert torch.allclose(terms.per_sample, terms.mse_per_sample + 0.5 * terms.perceptual_per_sample)
    assert torch.isclose(terms.total, terms.per_sample.mean())
    assert terms.perceptual > 0 and terms.mse > 0
    assert ReconstructionLoss(perceptual_weight=0.0, perceptual=perceptual).perceptual is None


# ---- adversarial -------------------------------------------------------------------------------------


def test_hinge_losses():
    high, low = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert hinge_d_loss(real_logits=high, fake_logits=low).item() == 0.0
    assert hinge_d_loss(real_logits=-high / 2, fake_logits=high / 2).item() == pytest.approx(2.0)
    assert hinge_d_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(1.0)
    assert hinge_g_loss(torch.full((3,), 3.0)).item() == pytest.approx(-3.0)
    assert adversarial_weight_at(99, start_step=100) == 0.0
    assert adversarial_weight_at(100, start_step=100) == 1.0
    assert adversarial_weight_at(500, start_step=100, value=0.3) == 0.3


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    weight = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], requires_grad=True)
    x = torch.tensor([1.0, 2.0, -1.0])
    out = weight @ x
    rec_loss = (out**2).sum()
    g_loss = 3.0 * out.sum()
    # by hand: d rec / dW = 2 out x^T, d g / dW = 3 * 1 x^T
    rec_grad = 2 * out.detach().unsqueeze(1) * x.unsqueeze(0)
    g_grad = 3 * torch.ones(2, 1) * x.unsqueeze(0)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    got = adaptive_adversarial_weight(rec_loss, g_loss, weight)
    assert not got.requires_grad
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert adaptive_adversarial_weight(rec_loss, g_loss, weight, max_weight=0.1).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="g_loss"):
        adaptive_adversarial_weight(rec_loss, torch.zeros((), requires_grad=True) * 1.0, weight)
    (rec_loss + got * g_loss).backward()  # graphs were kept for the real backward pass
    assert torch.allclose(weight.grad, rec_grad + got * g_grad)


@pytest.mark.parametrize("norm", ["group", "spectral"])
def test_patch_discriminator_gives_patch_logits_and_learns(norm):
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=3, base_channels=8, n_layers=2, norm=norm)
    real = torch.rand(1, 3, 32, 32) * 0.2 + 0.7
    fake = torch.rand(1, 3, 32, 32) * 0.2
    logits = disc(real)
    assert logits.shape == (1, 1, 6, 6)
    optimizer = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    first = hinge_d_loss(disc(real), disc(fake)).item()
    for _ in range(20):
        optimizer.zero_grad()
        hinge_d_loss(disc(real), disc(fake)).backward()
        optimizer.step()
    assert hinge_d_loss(disc(real), disc(fake)).item() < 0.5 * first
    with pytest.raises(ValueError, match="sides >= 12"):
        disc(torch.rand(1, 3, 8, 8))
    restored = PatchDiscriminator(in_channels=3, base_channels=8, n_layers=2, norm=norm)
    restored.load_state_dict(disc.state_dict())
    disc.eval()
    restored.eval()
    assert torch.equal(restored(real), disc(real))


# ---- length control ----------------------------------------------------------------------------------


def test_length_control_gradient_signs():
    control = LengthControl(weight_start=1.0, weight_max=1.0)
    control.update(1.0)  # tau = 1.0
    logits = torch.zeros(2, 6, requires_grad=True)
    lengths = torch.tensor([3, 4])
    rec = torch.tensor([0.5, 2.0])  # sample 0 beats tau, sample 1 does not
    control.loss(logits, lengths, rec, step=0).backward()
    grad = logits.grad
    # good sample: only its end position, pushed up (descent raises the EOS logit at index L-1)
    assert grad[0, 2] < 0
    assert torch.count_nonzero(grad[0]) == 1
    # bad sample: every position up to its length pushed down, nothing after it
    assert (grad[1, :4] > 0).all()
    assert torch.count_nonzero(grad[1, 4:]) == 0


def test_length_control_moves_the_predicted_length():
    control = LengthControl(weight_start=1.0, weight_max=1.0)
    control.update(1.0)
    max_tokens = 16
    logits = torch.tensor([[-3.0] * max_tokens, [3.0] * max_tokens], requires_grad=True)
    before = lengths_from_eos(torch.sigmoid(logits.detach()), 0.5, 1)
    assert before.tolist() == [max_tokens, 1]
    optimizer = torch.optim.SGD([logits], lr=2.0)
    for _ in range(40):
        optimizer.zero_grad()
        control.loss(logits, torch.tensor([4, 6]), torch.tensor([0.2, 3.0]), step=0).backward()
        optimizer.step()
    after = lengths_from_eos(torch.sigmoid(logits.detach()), 0.5, 1)
    assert after[0] == 4  # good enough at 4 tokens: ends earlier than before
    assert after[1] > 6  # not good enough at 6 tokens: ends after 6


def test_length_control_threshold_weight_and_state():
    control = LengthControl(history=3, weight_start=0.01, weight_max=0.21, ramp_steps=100)
    assert control.threshold is None
    assert control.weight_at(0) == pytest.approx(0.01)
    assert control.weight_at(50) == pytest.approx(0.11)
    assert control.weight_at(100) == pytest.approx(0.21)
    assert control.weight_at(10_000) == pytest.approx(0.21)
    late = LengthControl(weight_start=0.01, weight_max=0.21, ramp_steps=100, start_step=400)
    assert [late.weight_at(s) for s in (0, 400, 450, 500)] == pytest.approx([0.01, 0.01, 0.11, 0.21])
    logits, lengths = torch.randn(4, 8), torch.tensor([1, 3, 5, 8])
    rec = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert control.loss(logits, lengths, rec, 100) / control.loss(logits, lengths, rec, 0) == pytest.approx(21.0)
    # before any history tau is the batch mean (0.25): samples 0, 1 good; 2, 3 bad
    empty_tau = control.loss(logits, lengths, rec, 0)
    control.update(0.25)
    assert control.loss(logits, lengths, rec, 0) == pytest.approx(empty_tau.item())
    for value in (5.0, 1.0, 2.0, 3.0):
        control.update(torch.tensor(value))
    assert control.recorded == [1.0, 2.0, 3.0] and control.threshold == pytest.approx(2.0)
    with pytest.warns(UserWarning, match="non-finite"):
        control.update(float("nan"))
    assert control.threshold == pytest.approx(2.0)

    state = json.loads(json.dumps(control.state_dict()))
    resumed = LengthControl(history=3, weight_start=0.01, weight_max=0.21, ramp_steps=100)
    resumed.load_state_dict(state)
    assert resumed.recorded == control.recorded and resumed.skipped == 1
    assert torch.equal(resumed.loss(logits, lengths, rec, 7), control.loss(logits, lengths, rec, 7))
    with pytest.raises(ValueError, match="lengths must lie in"):
        control.loss(logits, torch.tensor([0, 3, 5, 9]), rec, 0)


def test_length_control_judges_each_kind_against_its_own_threshold():
    control = LengthControl(history=4, weight_start=1.0, weight_max=1.0)
    whole, question = LengthControl.WHOLE_IMAGE, LengthControl.QUESTION
    control.update(0.01, kind=whole)  # whole images: mostly easy background
    control.update(0.2, kind=question)  # boxes: objects only
    assert control.threshold == control.threshold_of(whole) == pytest.approx(0.01)
    assert control.threshold_of(question) == pytest.approx(0.2)
    logits = torch.zeros(4, 6, requires_grad=True)
    lengths = torch.tensor([3, 3, 3, 3])
    rec = torch.tensor([0.005, 0.05, 0.1, 0.3])
    kinds = torch.tensor([whole, whole, question, question])
    control.loss(logits, lengths, rec, step=0, kinds=kinds).backward()
    good = logits.grad[:, 2] < 0  # a good sample's end position is pushed up
    assert good.tolist() == [True, False, True, False]
    # without kinds every sample meets the whole-image threshold, and both boxes count as bad
    plain = torch.zeros(4, 6, requires_grad=True)
    control.loss(plain, lengths, rec, step=0).backward()
    assert (plain.grad[:, 2] < 0).tolist() == [True, False, False, False]
    # a kind without history is judged against its own batch mean
    fresh = LengthControl(weight_start=1.0, weight_max=1.0)
    first = torch.zeros(4, 6, requires_grad=True)
    fresh.loss(first, lengths, rec, step=0, kinds=kinds).backward()
    assert (first.grad[:, 2] < 0).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="kinds"):
        control.loss(logits, lengths, rec, step=0, kinds=torch.tensor([0, 1, 2, 0]))
    state = json.loads(json.dumps(control.state_dict()))
    resumed = LengthControl(history=4)
    resumed.load_state_dict(state)
    assert resumed.recorded_of(question) == [0.2] and resumed.recorded == [0.01]
    older = LengthControl(history=4)
    older.load_state_dict({"history": 4, "losses": [0.5], "skipped": 0})  # saved before kinds existed
    assert older.threshold == 0.5 and older.threshold_of(question) is None


def test_sample_training_lengths():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.full((4000,), 7)
    lengths = sample_training_lengths(predicted, max_tokens=32, min_tokens=2, uniform_fraction=0.3, generator=generator)
    assert lengths.dtype == torch.long and lengths.shape == (4000,)
    assert lengths.min() >= 2 and lengths.max() <= 32
    assert lengths.min() == 2 and lengths.max() == 32
    changed = (lengths != 7).float().mean().item()
    assert changed == pytest.approx(0.3 * 30 / 31, abs=0.03)  # a uniform draw lands on 7 one time in 31
    clamped = sample_training_lengths(torch.tensor([0, 5, 99]), max_tokens=32, min_tokens=2, uniform_fraction=0.0)
    assert clamped.tolist() == [2, 5, 32]
    again = sample_training_lengths(predicted, 32, 2, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again, lengths)


def test_drop_queries():
    queries = ["what colour is the circle?", "", "is there a square?"]
    relevance = box_mask(3, 8, 1, 1, 3)
    kept, mask = drop_queries(queries, relevance, p=0.0)
    assert kept == queries
    assert torch.equal(mask[0], relevance[0]) and torch.equal(mask[2], relevance[2])
    assert torch.equal(mask[1], torch.ones_like(mask[1]))  # an empty query makes the whole image relevant
    dropped, mask = drop_queries(queries, relevance, p=1.0)
    assert dropped == ["", "", ""] and torch.equal(mask, torch.ones_like(relevance))
    assert torch.equal(relevance, box_mask(3, 8, 1, 1, 3))  # the caller's masks are untouched
    many, _ = drop_queries(["q"] * 2000, None, p=0.5, generator=torch.Generator().manual_seed(0))
    assert many.count("") / 2000 == pytest.approx(0.5, abs=0.05)


def test_drop_queries_blanks_query_and_relevance_together_and_replays_with_its_seed():
    relevance = torch.zeros(64, 1, 4, 4)
    relevance[:, :, :2, :2] = 1
    queries = [f"q{i}" for i in range(64)]
    kept, mask = drop_queries(queries, relevance, p=0.5, generator=torch.Generator().manual_seed(0))
    blank = [q == "" for q in kept]
    assert 10 < sum(blank) < 54
    for row, is_blank in enumerate(blank):
        assert bool(mask[row].eq(1).all()) == is_blank
    assert queries[0] == "q0" and relevance.sum() == 64 * 4, "the inputs are left alone"
    again, _ = drop_queries(queries, relevance, p=0.5, generator=torch.Generator().manual_seed(0))
    assert again == kept


# ---- the EOS head's start ------------------------------------------------------------------------------


def test_a_fresh_tokenizer_starts_at_the_full_length():
    from tokenizer import DoveTokenizer

    torch.manual_seed(0)
    model = DoveTokenizer.from_preset("dove-tiny").eval()
    images = torch.rand(4, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        encoding = model.encode(images, queries=["is there a red circle?", None, "", "how many squares?"])
    assert encoding.lengths.tolist() == [model.max_tokens] * 4
    assert float(encoding.eos_probs.max()) < model.config.eos_threshold


@pytest.mark.slow
def test_the_full_presets_generator_starts_at_the_full_length():
    from tokenizer.modeling.generator import TokenGenerator, initial_eos_bias
    from tokenizer.modeling.presets import preset_config

    config = preset_config("dove-pythia70m-amused256")
    torch.manual_seed(0)
    generator = TokenGenerator(config).eval()  # the 70M generator alone; the VQ plays no part in the EOS head
    latents = torch.randn(2, config.latent_channels, config.grid_size, config.grid_size)
    with torch.no_grad():
        _, eos_logits = generator(latents, torch.randint(0, 1000, (2, 7)))
    lengths = lengths_from_eos(torch.sigmoid(eos_logits), config.eos_threshold, config.min_tokens)
    assert lengths.tolist() == [config.max_tokens] * 2
    assert initial_eos_bias(256, 0.5) == pytest.approx(-5.54, abs=0.01)  # end probability 1/N
    assert initial_eos_bias(8, 0.05) < torch.logit(torch.tensor(0.05)).item()  # always below the threshold
