"""Tests for the brat training losses in pretrained.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.scoring import pva_score
from pretrained.losses import (
    DPP_EPS,
    OBJECTIVES,
    BratLoss,
    ContrastiveLoss,
    build_loss,
    dpp_loss,
    gather_features,
    info_nce,
    pairwise_repulsion,
    symmetric_info_nce,
)


def softplus(value: float) -> float:
    return math.log1p(math.exp(value))


def random_batch(n: int = 6, n_views: int = 4, n_slots: int = 5, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(n, n_views, dim, generator=generator, dtype=torch.float64), dim=-1)
    sentences = F.normalize(torch.randn(n, n_slots, dim, generator=generator, dtype=torch.float64), dim=-1)
    lengths = torch.randint(1, n_slots + 1, (n,), generator=generator)
    mask = torch.arange(n_slots)[None, :] < lengths[:, None]
    attention = torch.softmax(torch.randn(n, n_views, 16, generator=generator, dtype=torch.float64), dim=-1)
    return views, sentences, mask, attention


def test_symmetric_info_nce_hand_value():
    scores = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    # logits = scores / 0.5 = [[1.6, 0.4], [0.8, 1.2]].
    # Rows: targets 0 and 1 give softplus(-1.2) and softplus(-0.4).
    # Columns: [1.6, 0.8] with target 0 and [0.4, 1.2] with target 1 both give softplus(-0.8).
    image_to_report = (softplus(-1.2) + softplus(-0.4)) / 2
    report_to_image = softplus(-0.8)
    expected = (image_to_report + report_to_image) / 2
    assert symmetric_info_nce(scores, 0.5).item() == pytest.approx(expected, rel=1e-6)
    loss = ContrastiveLoss(init_temperature=0.5)
    assert loss(scores).item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_info_nce_with_permuted_labels():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.2, 0.0, 0.7], [0.8, 0.4, 0.1]])
    labels = torch.tensor([1, 2, 0])
    permuted = scores[:, labels]  # positives moved onto the diagonal
    expected = symmetric_info_nce(permuted, 0.1)
    torch.testing.assert_close(symmetric_info_nce(scores, 0.1, labels), expected)


def test_symmetric_info_nce_rejects_non_permutation():
    with pytest.raises(ValueError, match="permutation"):
        symmetric_info_nce(torch.zeros(3, 3), 0.1, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="must be square"):
        symmetric_info_nce(torch.zeros(2, 3), 0.1)


def test_info_nce_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must index columns 0..1"):
        info_nce(torch.zeros(2, 2), 0.1, torch.tensor([0, 2]))


def test_temperature_clamped_to_bounds():
    loss = ContrastiveLoss(init_temperature=0.07, min_temperature=0.01, max_temperature=0.5)
    assert loss.temperature.item() == pytest.approx(0.07, rel=1e-6)
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(10.0))
    assert loss.temperature.item() == pytest.approx(0.5)
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-5))
    assert loss.temperature.item() == pytest.approx(0.01)
    loss(torch.tensor([[0.9, 0.1], [0.2, 0.7]])).backward()
    assert loss.log_temperature.grad.item() == 0.0


def test_temperature_learns_inside_bounds():
    loss = ContrastiveLoss(init_temperature=0.07)
    loss(torch.tensor([[0.9, 0.1], [0.2, 0.7]])).backward()
    assert loss.log_temperature.grad.item() != 0.0
    with pytest.raises(ValueError, match="min_temperature <= init_temperature"):
        ContrastiveLoss(init_temperature=0.9, max_temperature=0.5)


def test_dpp_two_by_two_hand_value():
    attention = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64)
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    h1, h2 = 1.0, entropy / math.log(2)
    cosine = (0.5 * 0.9 + 0.5 * 0.1) / (math.sqrt(0.5) * math.sqrt(0.82))
    determinant = (h1 * h1 + DPP_EPS) * (h2 * h2 + DPP_EPS) - (h1 * h2 * cosine) ** 2
    expected = -math.log(determinant) / 2
    assert dpp_loss(attention).item() == pytest.approx(expected, rel=1e-9)


def test_dpp_collapsed_set_large_and_finite():
    n_views = 8
    attention = torch.softmax(torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    collapsed = attention.expand(2, n_views, 32).contiguous()
    value = dpp_loss(collapsed)
    assert torch.isfinite(value)
    # det K ~ eps**(Q - 1), so the loss is at least about (Q - 1) / Q * -log(eps).
    assert value.item() > (n_views - 1) / n_views * -math.log(DPP_EPS) - 1.0


def test_dpp_orthogonal_lower_than_overlapping():
    orthogonal = torch.zeros(1, 4, 16)
    for view in range(4):
        orthogonal[0, view, 4 * view : 4 * view + 4] = 0.25
    overlapping = torch.zeros(1, 4, 16)
    for view in range(4):
        overlapping[0, view, view : view + 4] = 0.25  # shifted windows share tokens
    assert dpp_loss(orthogonal).item() < dpp_loss(overlapping).item()
    # Orthogonal maps with entropy log 4 / log 16 = 0.5: K = 0.25 I + eps I.
    assert dpp_loss(orthogonal).item() == pytest.approx(-math.log(0.25 + DPP_EPS), rel=1e-5)


def test_dpp_gradients_finite_with_zero_entries():
    logits = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    attention = torch.softmax(logits, dim=-1)
    sparse = torch.where(torch.arange(8) < 6, attention, torch.zeros(()))
    sparse = sparse / sparse.sum(dim=-1, keepdim=True)
    value = dpp_loss(sparse)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_dpp_returns_input_dtype():
    attention = torch.full((1, 2, 4), 0.25, dtype=torch.float32)
    assert dpp_loss(attention).dtype == torch.float32


@pytest.mark.parametrize(
    ("attention", "message"),
    [
        (torch.full((1, 2, 4), 0.3), "rows must sum to 1"),
        (torch.tensor([[[1.5, -0.5]]]), "negative entries"),
        (torch.full((2, 4), 0.25), r"must have shape \(B, Q, L\)"),
        (torch.ones(1, 2, 1), "needs L >= 2"),
    ],
)
def test_dpp_rejects_invalid_attention(attention, message):
    with pytest.raises(ValueError, match=message):
        dpp_loss(attention)


def test_pairwise_repulsion_hand_value():
    attention = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
    # Cosines: (0, 1) and (1, 2) are sqrt(0.5), (0, 2) is 0. Mean over 6 ordered pairs.
    expected = 4 * math.sqrt(0.5) / 6
    assert pairwise_repulsion(attention).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="Q >= 2"):
        pairwise_repulsion(torch.ones(1, 1, 3) / 3)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_brat_loss_components_and_gradients(objective):
    views, sentences, mask, attention = random_batch()
    if objective == "clip":
        views, sentences, mask = views[:, :1], sentences[:, :1], mask[:, :1] | True
    views.requires_grad_(True)
    loss = build_loss(objective, dpp_weight=0.5).double()
    output = loss(views, sentences, mask, attention=attention)

    expected_keys = {"loss", "contrastive", "temperature"}
    if objective in ("pva", "pva-no-qd"):
        expected_keys.add("dpp")
    if objective == "pairwise-repulsion":
        expected_keys.add("repulsion")
    assert set(output) == expected_keys
    output["loss"].backward()
    assert torch.isfinite(views.grad).all()
    assert views.grad.abs().sum() > 0


def test_brat_loss_pva_combines_terms():
    views, sentences, mask, attention = random_batch()
    loss = build_loss("pva", dpp_weight=0.25).double()
    output = loss(views, sentences, mask, attention=attention)
    expected = symmetric_info_nce(pva_score(views, sentences, mask), 0.07)
    torch.testing.assert_close(output["contrastive"], expected)
    torch.testing.assert_close(output["dpp"], dpp_loss(attention))
    torch.testing.assert_close(output["loss"], expected + 0.25 * dpp_loss(attention))


def test_brat_loss_no_qd_has_no_dpp_gradient():
    views, sentences, mask, attention = random_batch()
    attention = attention.clone().requires_grad_(True)
    output = build_loss("pva-no-qd", dpp_weight=0.5).double()(views, sentences, mask, attention=attention)
    torch.testing.assert_close(output["loss"], output["contrastive"])
    assert not output["dpp"].requires_grad


def test_brat_loss_owned_rows_average_to_full_loss():
    views, sentences, mask, attention = random_batch(n=6)
    views.requires_grad_(True)
    labels = torch.tensor([2, 0, 1, 5, 3, 4])
    loss = build_loss("pva", dpp_weight=0.3).double()

    full = loss(views, sentences, mask, attention=attention, labels=labels)["loss"]
    (full_gradient,) = torch.autograd.grad(full, views)

    # Two simulated processes own rows 0..2 and 3..5, and DDP averages their gradients.
    parts = []
    for rows in (torch.arange(0, 3), torch.arange(3, 6)):
        parts.append(loss(views, sentences, mask, attention=attention[rows], labels=labels, rows=rows)["loss"])
    averaged = (parts[0] + parts[1]) / 2
    (split_gradient,) = torch.autograd.grad(averaged, views)
    torch.testing.assert_close(averaged, full)
    torch.testing.assert_close(split_gradient, full_gradient)


def test_brat_loss_input_errors():
    views, sentences, mask, attention = random_batch()
    with pytest.raises(ValueError, match="unknown objective 'pvaa'"):
        build_loss("pvaa")
    with pytest.raises(ValueError, match="needs the cross-attention maps"):
        build_loss("pva").double()(views, sentences, mask)
    with pytest.raises(ValueError, match="objective clip expects one image embedding"):
        build_loss("clip").double()(views, sentences, mask)
    with pytest.raises(ValueError, match="attention has 6 rows but this process owns 2 studies"):
        build_loss("pva").double()(views, sentences, mask, attention=attention, rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="6 studies and sentences has 5 reports"):
        build_loss("colbert").double()(views, sentences[:5], mask[:5])


def test_brat_loss_ignores_weight_without_diversity_term():
    assert BratLoss("colbert", dpp_weight=0.5).dpp_weight == 0.0
    assert BratLoss("pairwise-repulsion", dpp_weight=0.5).dpp_weight == 0.5


def test_gather_features_without_process_group():
    views, sentences, mask, _ = random_batch(n=3)
    gathered_views, gathered_sentences, gathered_mask, rows = gather_features(views, sentences, mask)
    assert gathered_views is views
    assert gathered_sentences is sentences
    assert gathered_mask is mask
    assert rows.tolist() == [0, 1, 2]


def _rank_batch(rank: int):
    """Return rank 0's batch (2 studies, S = 4) or rank 1's batch (3 studies, S = 2)."""
    n, n_slots = (2, 4) if rank == 0 else (3, 2)
    views, sentences, mask, _ = random_batch(n=n, n_views=3, n_slots=n_slots, dim=4, seed=10 + rank)
    return views, sentences, mask


def _gather_worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        views, sentences, mask = _rank_batch(rank)
        views.requires_grad_(True)
        gathered_views, gathered_sentences, gathered_mask, rows = gather_features(views, sentences, mask)
        loss = build_loss("pva-no-qd").double()
        value = loss(gathered_views, gathered_sentences, gathered_mask, rows=rows)["loss"]
        value.backward()
        torch.save(
            {
                "views": gathered_views.detach(),
                "sentences": gathered_sentences,
                "mask": gathered_mask,
                "rows": rows,
                "loss": value.detach(),
                "grad": views.grad,
            },
            f"{result_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_features_two_processes(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # Keep gloo on the loopback interface.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    batches = [_rank_batch(rank) for rank in range(2)]
    views = torch.cat([batch[0] for batch in batches])
    sentences = torch.cat([batch[1] for batch in batches[:1]] + [F.pad(batches[1][1], (0, 0, 0, 2))])
    mask = torch.cat([batches[0][2], F.pad(batches[1][2], (0, 2))])
    assert results[0]["rows"].tolist() == [0, 1]
    assert results[1]["rows"].tolist() == [2, 3, 4]
    for result in results:
        torch.testing.assert_close(result["views"], views)
        torch.testing.assert_close(result["sentences"], sentences)
        assert torch.equal(result["mask"], mask)

    # all_gather's backward sums every process's gradient into the owner's rows, so each
    # rank's local gradient is the gradient of the summed per-process losses.
    views.requires_grad_(True)
    loss = build_loss("pva-no-qd").double()
    total = sum(loss(views, sentences, mask, rows=rows)["loss"] for rows in (torch.arange(2), torch.arange(2, 5)))
    (expected_gradient,) = torch.autograd.grad(total, views)
    torch.testing.assert_close(results[0]["grad"], expected_gradient[:2])
    torch.testing.assert_close(results[1]["grad"], expected_gradient[2:])
