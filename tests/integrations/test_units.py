"""Fast checks without Ray: demo metrics and partitions, the strategy wrapper (into a real relay)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedrelay.demo.data import partition, synthetic
from fedrelay.demo.metrics import auroc, binary_metrics
from fedrelay.emitters import Emitter
from tests.support.stored import stored_events


def test_auroc_matches_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (60,), generator=gen).float()  # many ties
    labels = torch.randint(0, 2, (60,), generator=gen)
    pos = [s for s, y in zip(scores.tolist(), labels.tolist(), strict=True) if y]
    neg = [s for s, y in zip(scores.tolist(), labels.tolist(), strict=True) if not y]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert auroc(torch.tensor([0.3, 0.2]), torch.tensor([1, 1])) == 0.5  # one class: defined, not NaN


def test_binary_metrics_are_finite_even_when_nothing_is_predicted_positive():
    metrics = binary_metrics(torch.full((4,), -5.0), torch.tensor([0.0, 1.0, 0.0, 1.0]), loss=0.7)
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0 and metrics["f1"] == 0.0
    assert metrics["accuracy"] == 0.5 and all(math.isfinite(v) for v in metrics.values())


def test_generated_images_are_deterministic_and_classes_differ():
    a, b = synthetic(64, 16, seed=5), synthetic(64, 16, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.shape == (64, 1, 16, 16) and float(a.x.min()) >= 0 and float(a.x.max()) <= 1
    big = synthetic(400, 16, seed=0)
    # Consolidations brighten the lungs: pneumonia images are brighter on average.
    assert big.x[big.y == 1].mean() > big.x[big.y == 0].mean()


@pytest.mark.parametrize("scheme", ["iid", "noniid"])
def test_partitions_cover_every_sample_once(scheme):
    labels = synthetic(500, 8, seed=2).y
    parts = partition(labels, 5, scheme, seed=3)
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(500)) and all(len(p) >= 2 for p in parts)
    assert all(torch.equal(p, q) for p, q in zip(parts, partition(labels, 5, scheme, seed=3), strict=True))
    shares = [float(labels[p].mean()) for p in parts]
    if scheme == "iid":
        assert max(shares) - min(shares) < 0.2
    else:
        assert max(shares) - min(shares) > 0.3  # label skew between clients


# --------------------------------------------------------------------------- the strategy wrapper


@pytest.fixture
def task_identity():
    """Message objects need Flower's task identity, which a real run sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 99, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_metrics_of_keeps_finite_scalars_only():
    from flwr.app import MetricRecord

    from fedrelay.emitters.flower import metrics_of

    record = MetricRecord({"loss": 0.5, "n": 3, "hist": [1.0, 2.0], "bad": float("nan")})
    assert metrics_of(record) == {"loss": 0.5, "n": 3}
    assert metrics_of(None) == {}


def test_failing_start_streams_error_and_failed_end_and_restores_the_strategy(task_identity, relay, tmp_path):
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from fedrelay.emitters.flower import instrument

    class BrokenGrid:
        run = None

        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, messages, timeout=None):
            list(messages)
            raise ConnectionError("superlink went away")

    inner = FedAvg(min_available_nodes=2)
    # A real emitter and a real relay: what the wrapper emits must pass the relay's validation,
    # or it is refused and missing below.
    emitter = Emitter(relay.url, spool_dir=tmp_path / "spool")
    try:
        strategy = instrument(inner, emitter=emitter, run_id="r1", monitor="loss")
        assert strategy.fraction_train == inner.fraction_train  # attributes fall through
        with pytest.raises(ConnectionError, match="superlink went away"):
            strategy.start(BrokenGrid(), ArrayRecord(), num_rounds=2)
        assert emitter.flush(10), emitter.stats
        stats = emitter.stats
    finally:
        emitter.close(timeout=5)
    assert (stats["invalid"], stats["refused"]) == (0, 0), stats
    events = stored_events(relay, "r1")
    kinds = [e["type"] for e in events]
    assert kinds == ["training_start", "round_start", "error", "training_end"]
    start, begin, error, end = (e["data"] for e in events)
    assert start["num_rounds"] == 2 and start["num_clients"] == 2 and start["config"]["strategy"] == "FedAvg"
    assert begin["round"] == 1 and begin["total_rounds"] == 2
    assert sorted(begin["participating_nodes"]) == ["11", "12"]  # sampled in random order
    assert begin["participating_clients"] == 2  # no reply yet: client ids unknown, only how many
    assert error["message"] == "ConnectionError: superlink went away" and error["round"] == 1
    assert end["status"] == "failed" and end["rounds_completed"] == 0
    assert start["training_mode"] == "federated"
    assert all(e["source"]["role"] == "server" for e in events)
    # The wrapped strategy is left as it was: no instance attributes shadow its methods.
    assert not {"configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate"} & set(
        vars(inner)
    )
