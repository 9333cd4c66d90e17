"""Quadrant classification and the tracker: exact shares, additive merges across ranks, saved and reloaded."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from datasets import load_dataset
from reference import ragged_mask

from trl_tip import QUADRANT_NAMES, HistogramSpec, QuadrantCounts, QuadrantTracker, TokenStats, classify_quadrants


def four_quadrant_stats():
    entropy = torch.tensor([[3.0, 3.0, 0.1, 0.1, 0.2, 0.0]])
    reverse_kl = torch.tensor([[2.0, 0.01, 2.0, 0.01, 0.02, 0.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    return TokenStats(entropy, reverse_kl, reverse_kl * 2, mask)


def test_classification_with_fixed_and_median_thresholds():
    stats = four_quadrant_stats()
    fixed = classify_quadrants(stats, entropy_threshold=1.0, divergence_threshold=0.5)
    assert fixed.tolist() == [[0, 1, 2, 3, 3, -1]]
    # Medians of the 5 valid tokens: entropy 0.2, divergence 0.02; "high" is strictly above.
    assert classify_quadrants(stats).tolist() == [[0, 1, 2, 3, 3, -1]]


def random_stats(seed, lengths=(20, 13, 0), width=20, teacher_entropy=True):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(list(lengths), width)
    entropy = torch.rand(len(lengths), width, generator=g) * 5 * mask
    reverse_kl = torch.rand(len(lengths), width, generator=g).pow(4) * 2 * mask
    teacher = torch.rand(len(lengths), width, generator=g) * 3 * mask if teacher_entropy else None
    return TokenStats(entropy, reverse_kl, reverse_kl.sqrt(), mask, teacher_entropy=teacher)


def test_step_summary_shares_sum_to_one_and_count_exactly():
    tracker = QuadrantTracker(entropy_threshold=1.0, divergence_threshold=0.5)
    stats = four_quadrant_stats()
    keep = torch.tensor([[True, False, True, False, False, False]])
    summary = tracker.update(1, tracker.measure(stats, keep))
    assert summary["num_tokens"] == 5 and summary["num_selected"] == 2
    assert [summary[f"quadrant_share/{q}"] for q in QUADRANT_NAMES] == [0.2, 0.2, 0.2, 0.4]
    assert [summary[f"selected_share/{q}"] for q in QUADRANT_NAMES] == [0.5, 0.0, 0.5, 0.0]
    assert summary["selected_fraction"] == pytest.approx(0.4)
    assert summary["entropy/Q4"] == pytest.approx(0.15) and summary["reverse_kl/Q1"] == pytest.approx(2.0)
    assert summary["forward_kl/Q3"] == pytest.approx(4.0)


def test_histogram_counts_every_valid_token_once():
    spec = HistogramSpec(entropy_bins=8, entropy_max=4.0, log10_divergence_bins=6)
    tracker = QuadrantTracker(histogram=spec)
    stats = random_stats(0)
    counts = tracker.measure(stats, stats.mask)
    assert counts.histogram.shape == (8, 6)
    assert counts.histogram.sum() == stats.num_valid == counts.selected_histogram.sum()
    # entropy 3.0 -> bin 6 of [0, 4) in 8 bins; KL 0 -> lowest divergence bin.
    assert spec.bin_index(torch.tensor([3.0, 99.0]), torch.tensor([0.0, 1e9])).tolist() == [6 * 6 + 0, 7 * 6 + 5]


def test_micro_batches_and_merges_add_up():
    a, b = random_stats(1), random_stats(2)
    fixed = {"entropy_threshold": 2.0, "divergence_threshold": 0.1}
    one = QuadrantTracker(**fixed)
    one.update(5, one.measure(a, a.mask))
    one.update(5, one.measure(b, b.mask))
    left, right = QuadrantTracker(**fixed), QuadrantTracker(**fixed)
    left.update(5, left.measure(a, a.mask))
    right.update(5, right.measure(b, b.mask))
    merged = left.merge(right)
    assert merged.step_rows() == one.step_rows()
    assert torch.equal(merged.total().histogram, one.total().histogram)


def test_save_load_and_datasets(tmp_path):
    tracker = QuadrantTracker()
    for step in range(1, 4):
        stats = random_stats(step)
        keep = stats.mask & (stats.entropy > 2)
        tracker.update(step, tracker.measure(stats, keep))
    tracker.save(tmp_path / "tip_stats")
    again = QuadrantTracker.load(tmp_path / "tip_stats")
    assert again.step_rows() == tracker.step_rows()
    steps = load_dataset("json", data_files=str(tmp_path / "tip_stats" / "steps.jsonl"), split="train")
    assert steps["step"] == [1, 2, 3]
    for row in steps:
        assert sum(row[f"quadrant_share/{q}"] for q in QUADRANT_NAMES) == pytest.approx(1.0)
    hist = load_dataset("json", data_files=str(tmp_path / "tip_stats" / "histogram.jsonl"), split="train")
    assert sum(hist["tokens"]) == sum(r["num_tokens"] for r in tracker.step_rows())
    splits = tracker.to_dataset_dict()
    assert set(splits) == {"steps", "histogram"} and splits["steps"].num_rows == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    tracker = QuadrantTracker(entropy_threshold=2.0, divergence_threshold=0.1)
    stats = random_stats(10 + rank)
    reduced = tracker.measure(stats, stats.entropy > 1).all_reduce()
    torch.save(reduced.flatten(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_across_two_processes_gives_the_global_counts(tmp_path):
    mp.spawn(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    tracker = QuadrantTracker(entropy_threshold=2.0, divergence_threshold=0.1)
    local = [tracker.measure(s, s.entropy > 1) for s in (random_stats(10), random_stats(11))]
    expected = (local[0] + local[1]).flatten()
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_all_reduce_without_a_process_group_is_identity():
    counts = QuadrantCounts.zeros(HistogramSpec())
    assert counts.all_reduce() is counts


def test_bad_tracker_arguments():
    with pytest.raises(ValueError, match="`entropy_threshold` must be one of 'median'"):
        QuadrantTracker(entropy_threshold="p50")
    with pytest.raises(ValueError, match="must be positive"):
        HistogramSpec(entropy_bins=0)
    with pytest.raises(ValueError, match="different histogram bins"):
        QuadrantTracker().merge(QuadrantTracker(histogram=HistogramSpec(entropy_bins=3)))


def test_teacher_entropy_means_per_quadrant():
    """`teacher_entropy/Q*` and `teacher_entropy` are the means of `TokenStats.teacher_entropy` over each quadrant's
    valid tokens and over all of them, computed directly here from a hand-made batch."""
    stats = four_quadrant_stats()
    # Quadrants of the valid tokens (fixed thresholds): Q1, Q2, Q3, Q4, Q4; the last position is padding.
    stats.teacher_entropy = torch.tensor([[1.5, 0.25, 4.0, 0.5, 1.0, 0.0]])
    tracker = QuadrantTracker(entropy_threshold=1.0, divergence_threshold=0.5)
    summary = tracker.update(1, tracker.measure(stats, stats.mask))
    assert [summary[f"teacher_entropy/{q}"] for q in QUADRANT_NAMES] == [1.5, 0.25, 4.0, 0.75]
    assert summary["teacher_entropy"] == pytest.approx((1.5 + 0.25 + 4.0 + 0.5 + 1.0) / 5)

    stats = random_stats(3)
    quadrant = classify_quadrants(stats)
    summary = QuadrantTracker().measure(stats, stats.mask).summary()
    for i, q in enumerate(QUADRANT_NAMES):
        expected = stats.teacher_entropy[quadrant == i].double().mean().item()
        assert summary[f"teacher_entropy/{q}"] == pytest.approx(expected, rel=1e-12)
    assert summary["teacher_entropy"] == pytest.approx(stats.teacher_entropy[stats.mask].double().mean().item())


def test_statistics_without_teacher_entropy_leave_its_keys_out():
    """Hand-built statistics (no `teacher_entropy`) are measured as before, without the teacher-entropy keys; merged
    with statistics that have one, the means count only the tokens it was measured on."""
    fixed = {"entropy_threshold": 2.0, "divergence_threshold": 0.1}
    without, with_it = random_stats(4, teacher_entropy=False), random_stats(5)
    tracker = QuadrantTracker(**fixed)
    summary = tracker.update(1, tracker.measure(without, without.mask))
    assert not any(key.startswith("teacher_entropy") for key in summary)
    assert summary["num_tokens"] == without.num_valid
    summary = tracker.update(1, tracker.measure(with_it, with_it.mask))
    alone = QuadrantTracker(**fixed).measure(with_it, with_it.mask).summary()
    for key in ["teacher_entropy", *(f"teacher_entropy/{q}" for q in QUADRANT_NAMES)]:
        assert summary[key] == pytest.approx(alone[key], rel=1e-12), key
    assert summary["num_tokens"] == without.num_valid + with_it.num_valid


def test_teacher_entropy_is_saved_and_a_tracker_saved_without_it_still_loads(tmp_path):
    tracker = QuadrantTracker()
    for step in range(1, 3):
        stats = random_stats(step)
        tracker.update(step, tracker.measure(stats, stats.mask & (stats.entropy > 2)))
    tracker.save(tmp_path / "new")
    again = QuadrantTracker.load(tmp_path / "new")
    assert again.step_rows() == tracker.step_rows()
    steps = load_dataset("json", data_files=str(tmp_path / "new" / "steps.jsonl"), split="train")
    assert all(row["teacher_entropy"] > 0 and "teacher_entropy/Q1" in row for row in steps)

    # A tracker.json written before the teacher's entropy was recorded: no `teacher_entropy_*` fields.
    state = tracker.state_dict()
    for counts in state["steps"].values():
        del counts["teacher_entropy_sum"], counts["teacher_entropy_tokens"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tracker.json").write_text(json.dumps(state))
    old = QuadrantTracker.load(tmp_path / "old")
    rows = old.step_rows()
    assert [row["step"] for row in rows] == [1, 2]
    assert not any(key.startswith("teacher_entropy") for row in rows for key in row)
    expected = [{k: v for k, v in row.items() if not k.startswith("teacher_entropy")} for row in tracker.step_rows()]
    assert rows == expected
    # It keeps accumulating (and flattening, as `all_reduce` does) with counts that have the field.
    stats = random_stats(9)
    summary = old.update(2, old.measure(stats, stats.mask))
    assert summary["teacher_entropy"] == pytest.approx(stats.teacher_entropy[stats.mask].double().mean().item())
    counts = old.steps[2]
    assert torch.equal(counts.unflatten(counts.flatten()).flatten(), counts.flatten())
