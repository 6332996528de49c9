"""Deferred MoE expert weight gradients (remote_runtime/model/expert_wgrad.py): the Triton kernel
over several micro-batches' rows (here under its CPU interpreter) equals the per-expert sum, the
deferral adds nothing before its depth or the step's last micro-batch and everything by then, and
the auto depth's arithmetic."""

import pytest
import torch

from remote_runtime.model import expert_wgrad, ops
from remote_runtime.model.expert_wgrad import ExpertWgrad, WgradDeferral

E, N, K = 4, 24, 40

interpreted = pytest.mark.skipif(
    not ops.interpreted(),
    reason="CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
)


def _segment(counts):
    counts = torch.tensor(counts)
    rows = int(counts.sum())
    dy, x = torch.randn(rows, N), torch.randn(rows, K)
    return dy, x, torch.cumsum(counts, 0).to(torch.int32)


def _reference(main_grad, segments):
    out = main_grad.clone()
    for dy, x, offsets in segments:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        for e, (gs, xs) in enumerate(zip(torch.split(dy, counts), torch.split(x, counts))):
            out[e] += gs.t() @ xs
    return out


@interpreted
@pytest.mark.parametrize("depth", [1, 3, 8])
def test_segments_add_every_micro_batch_rows(depth):
    """One launch over `depth` segments = the per-expert sums of all of them added to what
    main_grad held; empty experts (in one segment or all) and a row block past 64 included."""
    pytest.importorskip("triton")
    torch.manual_seed(depth)
    shapes = [[5, 0, 70, 1], [0, 0, 3, 130], [1, 2, 0, 4], [9, 0, 9, 9]]
    segments = [_segment(shapes[i % len(shapes)]) for i in range(depth)]
    main_grad = torch.randn(E, N, K)
    expected = _reference(main_grad, segments)
    expert_wgrad.accumulate_segments(main_grad, segments)
    torch.testing.assert_close(main_grad, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(main_grad[1], expected[1])  # no rows anywhere: untouched


def test_segment_count_is_bounded():
    with pytest.raises(ValueError, match="1 to 8"):
        expert_wgrad.accumulate_segments(torch.zeros(E, N, K), [])


def _weight():
    w = torch.zeros(E, N, K, requires_grad=True)
    w.main_grad = torch.zeros(E, N, K)
    w.grad_added_to_main_grad = False
    return w


def _backward(w, wgrad, segment):
    """One micro-batch through the grouped linear's autograd function (the path GroupedExperts
    takes on GPU); returns its (dy, x, offsets)."""
    from remote_runtime.model.moe import _GroupedLinear

    _, x, offsets = segment
    y = _GroupedLinear.apply(x, w, offsets, wgrad)
    dy = torch.randn_like(y)
    y.backward(dy)
    return dy, x, offsets


@interpreted
def test_deferral_adds_at_its_depth_and_at_the_last_micro_batch():
    """Depth 2 over 5 micro-batches: main_grad moves after micro-batches 2, 4 and 5 (the step's
    last) and holds the exact sum then; nothing is left pending for the next step."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    w = _weight()
    deferral = WgradDeferral(2)
    wgrad = ExpertWgrad(deferral)
    deferral.begin_step(5)
    done, seen = [], []
    for i in range(5):
        seen.append(_backward(w, wgrad, _segment([3, 0, 7, 66])))
        assert w.grad_added_to_main_grad
        if i in (1, 3, 4):
            done = list(seen)
        torch.testing.assert_close(w.main_grad, _reference(torch.zeros(E, N, K), done))
    assert not wgrad.pending
    deferral.end_step()
    # outside a step (no begin_step) every micro-batch is added at once
    before = w.main_grad.clone()
    seg = _backward(w, wgrad, _segment([1, 1, 1, 1]))
    torch.testing.assert_close(w.main_grad, _reference(before, [seg]))


@interpreted
def test_left_over_rows_are_an_error_not_a_silent_loss():
    pytest.importorskip("triton")
    w = _weight()
    deferral = WgradDeferral(4)
    wgrad = ExpertWgrad(deferral)
    deferral.begin_step(3)  # the schedule promised 3 micro-batches but ran 1
    _backward(w, wgrad, _segment([2, 2, 2, 2]))
    with pytest.raises(RuntimeError, match="moe_wgrad_defer=1"):
        deferral.end_step()


def test_requested_depth_is_checked_and_capped():
    assert WgradDeferral("3").depth == 3  # from --option strings
    assert WgradDeferral(64).depth == expert_wgrad.MAX_DEPTH
    auto = WgradDeferral("auto")
    assert auto.depth == 1 and not auto.decided
    for bad in (0, "often", -2):
        with pytest.raises(ValueError, match="moe_wgrad_defer"):
            WgradDeferral(bad)


def test_auto_depth_uses_half_the_unused_memory():
    gib = 2**30
    # 40 GiB unused, 3.4 GiB kept per micro-batch: half is 20 GiB -> 5 more micro-batches
    assert expert_wgrad.depth_for(40 * gib, 3.4 * gib) == 6
    assert expert_wgrad.depth_for(5 * gib, 3.4 * gib) == 1  # not even one fits in half
    assert expert_wgrad.depth_for(1000 * gib, 1 * gib) == expert_wgrad.MAX_DEPTH
    assert expert_wgrad.depth_for(-1.0, 1 * gib) == 1


@interpreted
def test_auto_measures_the_first_step_and_stays_at_one_without_cuda():
    """auto: the first step runs undeferred and counts the kept bytes; on a machine without CUDA
    the measured step leaves the depth at 1."""
    pytest.importorskip("triton")
    w = _weight()
    deferral = WgradDeferral("auto")
    wgrad = ExpertWgrad(deferral)
    deferral.begin_step(2)
    for _ in range(2):
        _backward(w, wgrad, _segment([4, 4, 0, 4]))
        assert not wgrad.pending  # depth 1 while measuring
    assert deferral.kept_bytes == 2 * 12 * (N + K) * 4
    deferral.end_step()
    assert deferral.bytes_per_micro_batch == 12 * (N + K) * 4
    deferral.depth = 3  # what a GPU with room might choose: two micro-batches' rows held
    assert deferral.held_bytes(8) == 2 * 12 * (N + K) * 4
    assert deferral.held_bytes(2) == 12 * (N + K) * 4  # never more than the step holds
    deferral.depth = 1
    assert deferral.decided
    if not torch.cuda.is_available():
        assert deferral.depth == 1
