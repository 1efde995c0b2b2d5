"""The ternary operations, their valuations, and the batch stream of the ternary_vae experiment."""

import pytest
import torch

from trainlab.errors import ConfigError
from trainlab.experiments.ternary_vae.data import (
    N_OPS,
    N_TRITS,
    OperationBatches,
    Operations,
    level_counts,
    trits,
    valuation,
)


@pytest.fixture(scope="module")
def ops():
    return Operations("cpu")


def test_trits_round_trip_and_values():
    index = torch.arange(N_OPS)
    t = trits(index)
    assert t.shape == (N_OPS, N_TRITS)
    assert set(t.unique().tolist()) == {-1, 0, 1}
    powers = 3 ** torch.arange(N_TRITS)
    assert torch.equal(((t + 1) * powers).sum(-1), index)
    # digit 0 is the least significant: 1 = trits (0, -1, -1, ...) + 1 ; 3 -> digit 1 is 1
    assert trits(torch.tensor(1)).tolist() == [0] + [-1] * 8
    assert trits(torch.tensor(3)).tolist() == [-1, 0] + [-1] * 7
    assert trits(torch.tensor([[N_OPS - 1]])).shape == (1, 1, N_TRITS)


def test_out_of_range_index_is_refused():
    with pytest.raises(ValueError):
        trits(torch.tensor([N_OPS]))
    with pytest.raises(ValueError):
        valuation(torch.tensor([-1]))


def test_valuation_small_cases():
    assert valuation(torch.tensor([0, 1, 2, 3, 6, 9, 18, 27, 81, 3 ** 8, 2 * 3 ** 8])).tolist() == \
        [9, 0, 0, 1, 1, 2, 2, 3, 4, 8, 8]


def test_level_counts():
    counts = level_counts()
    assert counts == [13122, 4374, 1458, 486, 162, 54, 18, 6, 2, 1]
    assert sum(counts) == N_OPS
    # two-thirds of the operations share v = 0 (hierarchy_ceiling's reason)
    assert counts[0] * 3 == N_OPS * 2


def test_operations_tensors(ops):
    assert ops.index.tolist() == list(range(N_OPS))
    assert ops.x.dtype == torch.float32 and ops.x.shape == (N_OPS, N_TRITS)
    assert ops.target.dtype == torch.long and torch.equal(ops.target, ops.x.long() + 1)
    assert set(ops.target.unique().tolist()) == {0, 1, 2}
    assert torch.equal(ops.v, valuation(ops.index))


def test_batch_is_a_pure_function_of_seed_step_micro(ops):
    for stratified in (False, True):
        a = OperationBatches(ops, 64, seed=7, stratified=stratified, high_v_share=0.25, accum=2)
        b = OperationBatches(ops, 64, seed=7, stratified=stratified, high_v_share=0.25, accum=2)
        b.batch(900, 1)  # a different history must not change what (5, 1) draws
        first, again = a.batch(5, 1), b.batch(5, 1)
        assert set(first) == {"x", "target", "v", "index"}
        for key in first:
            assert torch.equal(first[key], again[key])
        assert not torch.equal(a.batch(6, 1)["index"], first["index"])
        assert not torch.equal(a.batch(5, 0)["index"], first["index"])
        other_seed = OperationBatches(ops, 64, seed=8, stratified=stratified, high_v_share=0.25, accum=2)
        assert not torch.equal(other_seed.batch(5, 1)["index"], first["index"])
        # the rows agree with the operations they name
        idx = first["index"]
        assert torch.equal(first["x"], ops.x[idx]) and torch.equal(first["v"], ops.v[idx])
        assert torch.equal(first["target"], ops.target[idx])


def test_epoch_covers_every_operation_once_when_batch_divides(ops):
    batch_size, accum = 729, 3  # 19683 = 27 * 729: 27 micro-batches, 9 optimizer steps per epoch
    stream = OperationBatches(ops, batch_size, seed=1, accum=accum)
    for epoch in range(2):
        picks = torch.cat([stream.picks(step, micro) for step in range(9 * epoch, 9 * (epoch + 1))
                           for micro in range(accum)])
        assert torch.equal(picks.sort().values, torch.arange(N_OPS))
    # a fresh permutation each epoch
    assert not torch.equal(stream.picks(0, 0), stream.picks(9, 0))
    assert stream.epoch_of(9) == 1.0 and stream.steps_for_epochs(1.0) == 9


def test_epoch_boundary_straddles_when_batch_does_not_divide(ops):
    batch_size = 1000  # 19.683 batches per epoch: batch 19 takes 683 of epoch 0 and 317 of epoch 1
    stream = OperationBatches(ops, batch_size, seed=3)
    batches = [stream.picks(step, 0) for step in range(40)]
    assert all(len(b) == batch_size for b in batches)
    stream_items = torch.cat(batches)  # 40,000 items: epochs 0 and 1 whole, then 634 of epoch 2
    for epoch in range(2):
        part = stream_items[epoch * N_OPS:(epoch + 1) * N_OPS]
        assert torch.equal(part.sort().values, torch.arange(N_OPS))
    assert len(stream_items[2 * N_OPS:].unique()) == 40_000 - 2 * N_OPS
    assert stream.epoch_of(40) == pytest.approx(40_000 / N_OPS)


def test_batch_larger_than_all_operations(ops):
    stream = OperationBatches(ops, 2 * N_OPS + 5, seed=0)
    picks = stream.picks(0, 0)
    assert len(picks) == 2 * N_OPS + 5
    assert torch.equal(picks[:N_OPS].sort().values, torch.arange(N_OPS))
    assert torch.equal(picks[N_OPS:2 * N_OPS].sort().values, torch.arange(N_OPS))


def test_stratified_share_is_exact(ops):
    batch_size, share, high_v_min = 256, 0.25, 2
    stream = OperationBatches(ops, batch_size, seed=11, high_v_share=share, high_v_min=high_v_min,
                              stratified=True)
    n_high = round(share * batch_size)
    seen_high = set()
    for step in range(20):
        v = stream.batch(step, 0)["v"]
        assert len(v) == batch_size
        assert int((v >= high_v_min).sum()) == n_high
        assert bool((v[:n_high] >= high_v_min).all())
        seen_high.update(stream.batch(step, 0)["index"][:n_high].tolist())
    # the high part is spread over the high pool (2187 operations), not stuck on a few
    assert len(seen_high) > 800
    # a share that does not round evenly: round(100 * 0.333) = 33
    odd = OperationBatches(ops, 100, seed=0, high_v_share=0.333, high_v_min=3, stratified=True)
    assert int((odd.batch(0, 0)["v"] >= 3).sum()) == 33


def test_stratified_extremes(ops):
    only_high = OperationBatches(ops, 50, seed=0, high_v_share=1.0, high_v_min=9, stratified=True)
    assert only_high.batch(0, 0)["index"].tolist() == [0] * 50  # v = 9 is the operation 0 alone
    none_high = OperationBatches(ops, 50, seed=0, high_v_share=0.0, high_v_min=1, stratified=True)
    assert bool((none_high.batch(0, 0)["v"] == 0).all())


def test_bad_arguments_are_refused(ops):
    for kwargs, key in [({"batch_size": 0}, "train.micro_batch"), ({"accum": 0}, "train.accum"),
                        ({"high_v_share": 1.5}, "data.high_v_share"), ({"high_v_min": 0}, "data.high_v_min"),
                        ({"high_v_min": 10}, "data.high_v_min")]:
        args = {"batch_size": 8, "seed": 0, **kwargs}
        with pytest.raises(ConfigError) as caught:
            OperationBatches(ops, **args)
        assert caught.value.key == key
    with pytest.raises(ValueError):
        OperationBatches(ops, 8, seed=0, accum=2).batch(0, 2)
