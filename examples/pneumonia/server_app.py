"""The three lines that stream a Flower run, in a plain Message-API app (no demo helpers).

    from fedrelay.emitters.flower import fedrelay_mod, instrument, report_epoch

    strategy = instrument(FedAvg(...), context)        # in the ServerApp's main
    app = ClientApp(mods=[fedrelay_mod])               # on the client side
    report_epoch(context, msg, epoch, {"loss": loss})  # optional, in the local training loop

The relay URL comes from the run config key ``fedrelay-url`` (``flwr run`` reads it from
pyproject's ``[tool.flwr.app.config]``), the node config, or ``FEDRELAY_URL``.
"""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrelay.demo.model import PneumoniaCNN
from fedrelay.emitters.flower import instrument

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = instrument(FedAvg(fraction_evaluate=1.0), context)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(PneumoniaCNN().state_dict()),
        num_rounds=int(context.run_config.get("num-server-rounds", 3)),
    )
