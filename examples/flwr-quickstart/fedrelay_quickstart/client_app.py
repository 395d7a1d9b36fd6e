"""The ClientApp: local training and evaluation; the fedrelay mod streams each message.

``fedrelay_mod`` sends ``client_progress`` when a train or evaluate message arrives and
``client_complete`` with the reply's metrics; ``report_epoch`` adds one event per local epoch.
The relay URL, token and CA file come from the run config (``fedrelay-url``, ``fedrelay-token``,
``fedrelay-ca-file``), then the node config, then ``FEDRELAY_*`` variables.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrelay.emitters.flower import fedrelay_mod, report_epoch

from . import task

app = ClientApp(mods=[fedrelay_mod])


def _data(context: Context) -> tuple:
    return task.load_partition(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y, _, _ = _data(context)
    config = msg.content["config"]
    weights, metrics = task.train(
        msg.content["arrays"].to_numpy_ndarrays(),
        x,
        y,
        epochs=int(context.run_config["local-epochs"]),
        lr=float(config.get("lr", context.run_config["learning-rate"])),
        on_epoch=lambda epoch, m: report_epoch(context, msg, epoch, m),
    )
    metrics["num-examples"] = len(y)
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, _, x, y = _data(context)
    metrics: dict = task.evaluate(msg.content["arrays"].to_numpy_ndarrays(), x, y)
    metrics["num-examples"] = len(y)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
