"""Flower (Message API, flwr >= 1.42) integration: server strategy wrapper, ClientApp mod, epoch helper.

Three pieces, each one line in user code:

- ``instrument(strategy, context)`` wraps any ``flwr.serverapp.strategy`` strategy (FedAvg, FedProx,
  FedAdam, ...) and streams ``training_start``, ``round_start``/``round_end`` and ``training_end``
  from the ServerApp; an exception streams ``error`` and ``training_end`` status ``failed``, then
  re-raises.
- ``fedrelay_mod`` (or ``client_mod(url=...)``) is a ClientApp mod streaming ``client_progress`` and
  ``client_complete`` per train/evaluate message, and ``error`` when the handler fails.
- ``report_epoch(context, msg, epoch, metrics)`` streams local-epoch progress from a training loop.

The run id defaults to Flower's ``context.run_id``, which the ServerApp and every ClientApp share, so
all events of one federation land in one relay run. The relay URL, publish token and CA file come
from an explicit argument, else the run config, else the node config (keys ``fedrelay-url``,
``fedrelay-token``, ``fedrelay-ca-file``), else the environment, else the emitter's default. The run
config comes first because ``flwr run`` starts a SuperLink that keeps the environment of its first
invocation. ``fedrelay-url`` may list several nodes of one relay, comma-separated (a run config
value is a string): the emitter fails over between them. Each process logs the URLs it uses and
where they came from, through Flower's logger, so that the line shows in ``flwr run`` and SuperNode
output.

Client ids: on the client side, the ``partition-id`` node config value (what simulations and users
think of as "client 3"), else the node id. The server only sees node ids; the mod adds a small
``ConfigRecord`` (``"fedrelay"``: ``client-id``) to each reply so that the strategy wrapper can report
client ids in ``round_start``/``round_end`` (``participating_clients`` etc., the value client events
carry as ``client_id``), next to the node ids (``participating_nodes`` etc., as strings: they are
64-bit and would lose precision in JavaScript). The wrapper removes the record before the wrapped
strategy aggregates, so the strategy sees the replies as the ClientApp made them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..client_settings import PUBLISH_TOKEN_ENVS, URL_ENV
from ..tls import CA_FILE_ENV
from . import Emitter, get_emitter
from .logs import LogSource, check_level, forwarding, installed_forwarder

URL_KEY = "fedrelay-url"
"""Run-config / node-config key holding the relay URL."""
TOKEN_KEY = "fedrelay-token"
"""Run-config / node-config key holding the publish token."""
CA_FILE_KEY = "fedrelay-ca-file"
"""Run-config / node-config key holding a CA bundle for a ``wss://`` relay."""
REPLY_RECORD = "fedrelay"
"""The ConfigRecord the mod adds to replies: ``client-id`` (see the module docstring)."""
_ENV = {
    URL_KEY: (URL_ENV,),
    TOKEN_KEY: PUBLISH_TOKEN_ENVS,
    CA_FILE_KEY: (CA_FILE_ENV,),
}
FLOWER_LOG = logging.getLogger("flwr.fedrelay")
"""Emitters of the Flower integration log through Flower's logger: its console handler shows INFO
in ``flwr run`` output, in SuperNode output and in Ray actor output, where Python's root logger is
not configured."""

_HOOKS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
_MAX_DETAIL = 4000
_HIGHER_IS_BETTER = ("acc", "auroc", "auc", "f1", "precision", "recall", "score", "iou", "dice")


# --------------------------------------------------------------------------- helpers


def relay_setting(context: Context | None, key: str) -> tuple[str | None, str]:
    """A fedrelay setting for this run and where it came from: run config, node config, environment.

    ``(None, "default")`` when none has it (the emitter then uses its default).
    """
    if context is not None:
        for where, config in (("run config", context.run_config), ("node config", context.node_config)):
            value = config.get(key) if config else None
            if isinstance(value, str) and value:
                return value, f"{where} {key}"
    for name in _ENV.get(key, ()):
        value = os.environ.get(name)
        if value:
            return value, name
    return None, "default"


def relay_url(context: Context | None = None) -> str | None:
    """The relay URL for this run (several comma-separated, as given): run config, node config, then
    ``FEDRELAY_URL``."""
    return relay_setting(context, URL_KEY)[0]


def emitter_for(context: Context | None, url: str | Sequence[str] | None = None) -> Emitter:
    """This process's emitter for the run's relay, with the run's token and CA file.

    ``url`` (an explicit argument) wins over the run config.
    """
    if url:
        source = "argument"
    else:
        url, source = relay_setting(context, URL_KEY)
    token, _ = relay_setting(context, TOKEN_KEY)
    ca_file, _ = relay_setting(context, CA_FILE_KEY)
    return get_emitter(url, url_source=source, token=token, ca_file=ca_file, logger=FLOWER_LOG)


def client_id_of(context: Context) -> int | str:
    """``partition-id`` when the node has one (simulation, most deployments), else the node id."""
    value = context.node_config.get("partition-id") if context.node_config else None
    if isinstance(value, int | str) and not isinstance(value, bool):
        return value
    return str(context.node_id)


def server_round_of(msg: Message) -> int | None:
    """The round a server message belongs to: strategies put it in the config as ``server-round``."""
    if not msg.has_content():
        return None
    content = msg.content
    configs = content.config_records
    preferred = configs.get("config")
    for record in (preferred, *configs.values()):
        if record is not None:
            value = record.get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def metrics_of(record: Mapping[str, Any] | None) -> dict[str, float | int]:
    """Finite scalar metrics only: lists, NaN and infinities are not valid wire metrics."""
    if not record:
        return {}
    out: dict[str, float | int] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[str(key)] = value
    return out


def reply_metrics(reply: Message) -> dict[str, float | int]:
    """Every MetricRecord of a reply, merged (``metrics`` is the usual one)."""
    if not reply.has_content():
        return {}
    merged: dict[str, float | int] = {}
    for record in reply.content.metric_records.values():
        merged.update(metrics_of(record))
    return merged


def _jsonable(value: Any) -> Any:
    """Config values as JSON: scalars kept, bytes summarised, lists kept if small."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value[:32]]
    return str(value)


def _config_dict(config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k): _jsonable(v) for k, v in (config or {}).items()}


def _strategy_params(strategy: Strategy) -> dict[str, Any]:
    """Public scalar attributes (fraction_train, proximal_mu, eta, ...) for the run's config."""
    params: dict[str, Any] = {}
    for key, value in vars(strategy).items():
        if key.startswith("_") or callable(value):
            continue
        if isinstance(value, bool | int | float | str) or value is None:
            params[key] = _jsonable(value)
    return params


def _error_detail(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return text[-_MAX_DETAIL:]


def _higher_is_better(name: str) -> bool:
    lowered = name.lower()
    return any(token in lowered for token in _HIGHER_IS_BETTER)


# --------------------------------------------------------------------------- server side


class _RoundState:
    """What one round has produced so far; turned into ``round_end``."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.started = time.perf_counter()
        self.train_sent: list[str] = []
        self.train_ok: list[str] = []
        self.eval_sent: list[str] = []
        self.eval_ok: list[str] = []
        self.failed: dict[str, str] = {}
        self.fit_metrics: dict[str, float | int] = {}
        self.eval_metrics: dict[str, float | int] = {}
        self.server_metrics: dict[str, float | int] | None = None
        self.ended = False


class InstrumentedStrategy(Strategy):
    """Any Message-API strategy, unchanged, plus telemetry. Build it with :func:`instrument`.

    ``start`` runs the wrapped strategy's own ``start`` (so strategies that override it keep their
    loop) with the four round hooks temporarily routed through this wrapper on the instance; the
    hooks are restored afterwards. Every other attribute is read from the wrapped strategy.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        emitter: Emitter | None = None,
        context: Context | None = None,
        url: str | Sequence[str] | None = None,
        run_id: str | None = None,
        experiment_name: str | None = None,
        num_clients: int | None = None,
        monitor: str = "loss",
        mode: str | None = None,
        flush_timeout: float = 5.0,
        forward_logs: bool | int | str | None = None,
    ) -> None:
        if mode not in (None, "min", "max"):
            raise ValueError("mode must be 'min', 'max' or None")
        self._inner = strategy
        self._calls: dict[str, Callable[..., Any]] = {name: getattr(strategy, name) for name in _HOOKS}
        self._emitter = emitter
        self._context = context
        self._url = url
        self._run_id = run_id
        self._experiment_name = experiment_name
        self._num_clients = num_clients
        self._monitor = monitor
        self._maximize = _higher_is_better(monitor) if mode is None else mode == "max"
        self._flush_timeout = flush_timeout
        self._forward_logs = check_level(forward_logs)
        self._log_source = LogSource(role="server")
        self._num_rounds: int | None = None
        self._has_evaluate_fn = False
        self._round: _RoundState | None = None
        self._clients: dict[str, int | str] = {}
        """Node id -> the client id its replies carried (the mod's ``fedrelay`` record)."""
        self._rounds_done = 0
        self._best: tuple[int, float] | None = None
        self._best_source: str | None = None
        self._t0 = 0.0

    # Attribute access falls through to the wrapped strategy (fraction_train, summary data, ...).
    def __getattr__(self, name: str) -> Any:
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def wrapped(self) -> Strategy:
        """The strategy being instrumented."""
        return self._inner

    @property
    def emitter(self) -> Emitter:
        if self._emitter is None:
            self._emitter = emitter_for(self._context, self._url)
        return self._emitter

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.emitter.emit(kind, data, run_id=self._run_id, role="server")

    # -- the strategy interface, delegated ------------------------------------------------------

    def summary(self) -> None:
        self._inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._close_round_before(server_round)
        messages = list(self._calls["configure_train"](server_round, arrays, config, grid))
        state = self._round = _RoundState(server_round)
        self._log_source.round = server_round
        state.train_sent = [str(m.metadata.dst_node_id) for m in messages]
        known = [self._clients.get(node) for node in state.train_sent]
        self._emit(
            "round_start",
            {
                "round": server_round,
                "total_rounds": self._num_rounds,
                # Client ids once every sampled node has replied before; until then how many.
                "participating_clients": known if None not in known else len(known),
                "participating_nodes": state.train_sent,
            },
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        state = self._state_for(server_round)
        state.train_ok = self._sort_replies(state, replies, state.train_sent, "train")
        arrays, metrics = self._calls["aggregate_train"](server_round, replies)
        state.fit_metrics = metrics_of(metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self._calls["configure_evaluate"](server_round, arrays, config, grid))
        self._state_for(server_round).eval_sent = [str(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        state = self._state_for(server_round)
        state.eval_ok = self._sort_replies(state, replies, state.eval_sent, "evaluate")
        metrics = self._calls["aggregate_evaluate"](server_round, replies)
        state.eval_metrics = metrics_of(metrics)
        if not self._has_evaluate_fn:
            self._end_round(state)
        return metrics

    # -- the run --------------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the wrapped strategy's ``start``, streaming the run as it goes."""
        if self._run_id is None:
            run = getattr(grid, "run", None)
            self._run_id = str(run.run_id) if run is not None else self.emitter.run_id
        self._num_rounds = num_rounds
        self._has_evaluate_fn = evaluate_fn is not None
        self._round, self._rounds_done, self._best, self._best_source = None, 0, None, None
        self._t0 = time.perf_counter()
        self._emit_training_start(grid, num_rounds, timeout, train_config, evaluate_config)
        logs = contextlib.ExitStack()  # records logged during the run, as `log` events (opt-in)
        self._log_source = LogSource(run_id=self._run_id, role="server")
        logs.enter_context(forwarding(self._forward_logs, self.emitter, self._log_source))

        hooked = self._hook()
        # Without instance attributes the hooks cannot be routed: run the base loop on the wrapper.
        run_start = self._inner.start if hooked is not None else lambda *a, **k: Strategy.start(self, *a, **k)
        try:
            result = run_start(
                grid,
                initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=self._wrap_evaluate_fn(evaluate_fn),
            )
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._unhook(hooked)
            logs.close()
        if self._round is not None and not self._round.ended:
            self._end_round(self._round)
        self._emit("training_end", {"status": "completed", **self._summary()})
        self.emitter.settle(self._flush_timeout)
        return result

    def _emit_training_start(
        self,
        grid: Grid,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord | None,
        evaluate_config: ConfigRecord | None,
    ) -> None:
        num_clients = self._num_clients
        if num_clients is None:
            # In a simulation the nodes may register after the ServerApp starts: then leave it out.
            try:
                num_clients = len(list(grid.get_node_ids())) or None
            except Exception:
                num_clients = None
        config = {
            "strategy": type(self._inner).__name__,
            "strategy_params": _strategy_params(self._inner),
            "train_config": _config_dict(train_config),
            "evaluate_config": _config_dict(evaluate_config),
            "timeout": timeout,
            "server_evaluation": self._has_evaluate_fn,
            "monitor": self._monitor,
        }
        data: dict[str, Any] = {"training_mode": "federated", "num_rounds": num_rounds, "config": config}
        if num_clients is not None:
            data["num_clients"] = num_clients
        if self._experiment_name:
            data["experiment_name"] = self._experiment_name
        local_epochs = (train_config or {}).get("local-epochs")
        if isinstance(local_epochs, int) and not isinstance(local_epochs, bool) and local_epochs >= 0:
            data["local_epochs"] = local_epochs
        self._emit("training_start", data)

    def _hook(self) -> dict[str, Any] | None:
        """Route the wrapped strategy's own calls through this wrapper for the run.

        Returns what to restore: the instance attributes the hooks shadowed (usually none), or None
        when the strategy does not take instance attributes (then its own calls go unobserved).
        """
        own = getattr(self._inner, "__dict__", None)
        if own is None:
            return None
        saved = {name: own[name] for name in _HOOKS if name in own}
        for name in _HOOKS:
            own[name] = getattr(self, name)
        return saved

    def _unhook(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            return
        own = self._inner.__dict__
        for name in _HOOKS:
            own.pop(name, None)
        own.update(saved)

    def _wrap_evaluate_fn(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None
    ) -> Callable[[int, ArrayRecord], MetricRecord | None] | None:
        if evaluate_fn is None:
            return None

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            result = evaluate_fn(server_round, arrays)
            metrics = metrics_of(result)
            if server_round == 0:
                self._emit(
                    "status",
                    {"message": "initial server-side evaluation", "level": "info", "round": 0,
                     "server_metrics": metrics},
                )  # fmt: skip
            else:
                state = self._state_for(server_round)
                state.server_metrics = metrics
                self._end_round(state)
            return result

        return evaluate

    def _state_for(self, server_round: int) -> _RoundState:
        """The current round's state; a strategy that skips configure_train still gets one."""
        if self._round is None or self._round.number != server_round:
            self._close_round_before(server_round)
            self._round = _RoundState(server_round)
            self._log_source.round = server_round
        return self._round

    def _close_round_before(self, server_round: int) -> None:
        if self._round is not None and self._round.number != server_round and not self._round.ended:
            self._end_round(self._round)

    def _client_of(self, node: str) -> int | str:
        """The client id a node reported, else the node id (what a ClientApp without a
        ``partition-id`` uses as its client id too)."""
        return self._clients.get(node, node)

    def _learn_client(self, node: str, reply: Message) -> None:
        """Read (and remove: the wrapped strategy sees the reply as the ClientApp made it) the
        client id the mod put in the reply."""
        if not reply.has_content():
            return
        content = reply.content
        record = content.config_records.get(REPLY_RECORD)
        if record is None:
            return
        value = record.get("client-id")
        if isinstance(value, int | str) and not isinstance(value, bool) and len(self._clients) < 100_000:
            self._clients[node] = value
        del content[REPLY_RECORD]

    def _sort_replies(
        self, state: _RoundState, replies: list[Message], sent: list[str], phase: str
    ) -> list[str]:
        """Successful node ids; error replies and missing replies are failures, streamed as errors."""
        ok: list[str] = []
        answered: set[str] = set()
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            answered.add(node)
            self._learn_client(node, reply)
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                self._client_failed(state, node, phase, reason)
            else:
                ok.append(node)
        for node in sent:
            if node not in answered:
                self._client_failed(state, node, phase, "no reply (timeout or lost node)")
        return ok

    def _client_failed(self, state: _RoundState, node: str, phase: str, reason: str) -> None:
        state.failed[node] = reason
        client = self._client_of(node)
        self._emit(
            "error",
            {
                "message": f"client {client} failed in {phase}",
                "detail": reason[-_MAX_DETAIL:],
                "client_id": client,
                "node_id": node,
                "round": state.number,
                "phase": phase,
            },
        )

    def _end_round(self, state: _RoundState) -> None:
        state.ended = True
        self._rounds_done = max(self._rounds_done, state.number)
        data: dict[str, Any] = {
            "round": state.number,
            "total_rounds": self._num_rounds,
            "fit_metrics": state.fit_metrics,
            "eval_metrics": state.eval_metrics,
            "duration": round(time.perf_counter() - state.started, 6),
            "participating_clients": [self._client_of(n) for n in state.train_ok],
            "evaluated_clients": [self._client_of(n) for n in state.eval_ok],
            "failed_clients": [self._client_of(n) for n in sorted(state.failed)],
            "participating_nodes": state.train_ok,
            "evaluated_nodes": state.eval_ok,
            "failed_nodes": sorted(state.failed),
            "num_failures": len(state.failed),
        }
        if state.server_metrics is not None:
            data["server_metrics"] = state.server_metrics
        self._track_best(state)
        self._emit("round_end", data)

    def _track_best(self, state: _RoundState) -> None:
        sources = {"server": state.server_metrics or {}, "eval": state.eval_metrics, "fit": state.fit_metrics}
        order = [self._best_source] if self._best_source else list(sources)
        for source in order:
            value = sources[source].get(self._monitor)
            if value is None:
                continue
            self._best_source = source
            if self._best is None or (value > self._best[1] if self._maximize else value < self._best[1]):
                self._best = (state.number, float(value))
            return

    def _summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "training_duration": round(time.perf_counter() - self._t0, 6),
            "rounds_completed": self._rounds_done,
        }
        if self._best is not None:
            data["best_round"] = self._best[0]
            data["best_metric_name"] = self._monitor
            data["best_metric_value"] = self._best[1]
            data["best_metric_source"] = self._best_source
        return data

    def _fail(self, exc: BaseException) -> None:
        stopped = isinstance(exc, KeyboardInterrupt)
        try:
            self._emit(
                "error",
                {
                    "message": f"{type(exc).__name__}: {exc}"[:1000],
                    "detail": _error_detail(exc),
                    "round": self._round.number if self._round is not None else None,
                },
            )
            self._emit("training_end", {"status": "stopped" if stopped else "failed", **self._summary()})
            self.emitter.settle(self._flush_timeout)
        except Exception:  # never mask the training error
            pass


def instrument(
    strategy: Strategy,
    context: Context | None = None,
    *,
    emitter: Emitter | None = None,
    url: str | Sequence[str] | None = None,
    run_id: str | None = None,
    experiment_name: str | None = None,
    num_clients: int | None = None,
    monitor: str = "loss",
    mode: str | None = None,
    flush_timeout: float = 5.0,
    forward_logs: bool | int | str | None = None,
) -> InstrumentedStrategy:
    """Wrap ``strategy`` so that ``start`` streams the run to a relay.

    ``context`` (the ServerApp's) supplies the run id and the relay URL; without it, the run id is
    the grid's run id at ``start``. ``monitor``/``mode`` pick the best round: the metric is looked up
    in the server-side ``evaluate_fn`` metrics, else the clients' aggregated evaluate metrics, else
    their train metrics; ``mode`` defaults to "max" for accuracy-like names and "min" otherwise.
    ``forward_logs`` (True for INFO, or a level) sends the ServerApp process's ``logging`` records
    during ``start`` as ``log`` events with the current round (:mod:`fedrelay.emitters.logs`).
    """
    if context is not None:
        run_id = run_id or str(context.run_id)
        if num_clients is None:
            value = context.run_config.get("num-clients") if context.run_config else None
            num_clients = value if isinstance(value, int) and not isinstance(value, bool) else None
    return InstrumentedStrategy(
        strategy,
        emitter=emitter,
        context=context,
        url=url,
        run_id=run_id,
        experiment_name=experiment_name,
        num_clients=num_clients,
        monitor=monitor,
        mode=mode,
        flush_timeout=flush_timeout,
        forward_logs=forward_logs,
    )


# --------------------------------------------------------------------------- client side


class ClientTelemetryMod:
    """ClientApp mod: ``client_progress`` when a train/evaluate message arrives, ``client_complete``
    with the reply's metrics and duration, ``error`` when the handler raises or replies with an error.

    It holds only plain settings, so Ray pickles it cheaply; the emitter is looked up per process
    with ``get_emitter``. Before handing the reply back it settles (``Emitter.settle``, bounded by
    ``flush_timeout``): then a client's events are stored before the server sees the reply, so
    ``client_complete`` precedes the server's ``round_end``. What is not acked by then (relay down)
    is spooled, so nothing is lost when the simulation ends its actors. The wait is one relay round
    trip (~1 ms locally) per message, none while the relay is known unreachable (also in a fresh
    process: see docs/emitters.md); ``flush_timeout=0`` skips it. Successful replies get a
    ``fedrelay`` ConfigRecord with the client id (``report_client_id=False`` leaves them alone).
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        flush_timeout: float = 2.0,
        phases=("train", "evaluate"),
        forward_logs: bool | int | str | None = None,
        report_client_id: bool = True,
    ):
        self.url = url
        self.flush_timeout = flush_timeout
        self.phases = tuple(phases)
        self.forward_logs = check_level(forward_logs)
        """While a message is handled, ``logging`` records go out as ``log`` events with its client
        id and round (True for INFO, or a level); None/False: off."""
        self.report_client_id = report_client_id

    def __call__(self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]):
        phase = msg.metadata.message_type.split(".", 1)[0]
        if phase not in self.phases:
            return call_next(msg, context)
        emitter = emitter_for(context, self.url)
        run_id = str(context.run_id)
        client_id = client_id_of(context)
        server_round = server_round_of(msg)
        base = {
            "round": server_round or 0,
            "client_id": client_id,
            "phase": phase,
            "node_id": str(context.node_id),
        }

        def emit(kind: str, data: dict[str, Any]) -> None:
            emitter.emit(kind, data, run_id=run_id, role="client", client_id=client_id)

        emit("client_progress", {**base, "status": "started"})
        started = time.perf_counter()
        source = LogSource(run_id=run_id, role="client", client_id=client_id, round=server_round)
        try:
            with forwarding(self.forward_logs, emitter, source):
                try:
                    reply = call_next(msg, context)
                except Exception as exc:
                    _forward_exception(exc, f"{phase} failed: {type(exc).__name__}: {exc}")
                    raise
        except BaseException as exc:
            emit(
                "error",
                {**base, "message": f"{phase} failed: {type(exc).__name__}: {exc}"[:1000],
                 "detail": _error_detail(exc)},
            )  # fmt: skip
            self._settle(emitter)
            raise
        duration = round(time.perf_counter() - started, 6)
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            emit("error", {**base, "message": f"{phase} failed", "detail": reason[-_MAX_DETAIL:]})
        else:
            metrics = reply_metrics(reply)
            data: dict[str, Any] = {**base, "metrics": metrics, "duration": duration}
            examples = metrics.get("num-examples")
            if isinstance(examples, int | float) and examples >= 0:
                data["num_examples"] = int(examples)
            emit("client_complete", data)
            if self.report_client_id and reply.has_content() and REPLY_RECORD not in reply.content:
                reply.content[REPLY_RECORD] = ConfigRecord({"client-id": client_id})
        self._settle(emitter)
        return reply

    def _settle(self, emitter: Emitter) -> None:
        """Before the reply leaves: the events acked, or else on disk.

        Ray ends actor processes without running atexit hooks, so events still in memory when
        the simulation ends would be lost: what the relay has not acked is spooled now, for the
        sender to deliver later or for ``fedrelay sync``. With the relay known to be unreachable,
        waiting for acks would only slow training down: ``settle`` does not.
        """
        if self.flush_timeout > 0:
            emitter.settle(self.flush_timeout)


def _forward_exception(exc: BaseException, message: str) -> None:
    """The handler's exception as a ``log`` event too (with its traceback), when logs are forwarded.

    In a simulation Flower logs it from the driver process, without the client's id; in a
    deployment, after the mod has returned.
    """
    forwarder = installed_forwarder()
    if forwarder is not None:
        forwarder.forward_exception(exc, message)


fedrelay_mod = ClientTelemetryMod()
"""The mod with default settings: ``ClientApp(mods=[fedrelay_mod])``."""


def client_mod(
    url: str | Sequence[str] | None = None,
    *,
    flush_timeout: float = 2.0,
    forward_logs: bool | int | str | None = None,
    report_client_id: bool = True,
) -> ClientTelemetryMod:
    """A mod with an explicit relay URL (e.g. for ``run_simulation``, which has no run config).

    ``forward_logs`` (True for INFO, or a level): records logged while a message is handled go out
    as ``log`` events carrying the client id and round, and so does the handler's exception.
    ``report_client_id``: the reply carries the client id for the strategy wrapper's round events.
    """
    return ClientTelemetryMod(
        url, flush_timeout=flush_timeout, forward_logs=forward_logs, report_client_id=report_client_id
    )


def report_epoch(
    context: Context,
    msg: Message,
    epoch: int,
    metrics: Mapping[str, Any] | None = None,
    *,
    url: str | Sequence[str] | None = None,
    **extra: Any,
) -> None:
    """Stream one local epoch (``client_progress`` with ``local_epoch``) from a client's training loop.

    ``epoch`` counts from 1 for the first local epoch, as ``FedRelayCallback`` and Flower's rounds
    do: from a 0-based ``for epoch in range(n)`` loop pass ``epoch + 1`` (an epoch 0 is sent as
    given, and logged once as a likely off-by-one). Never raises and costs microseconds: the event
    is queued and sent in the background.
    """
    try:
        if int(epoch) == 0 and not _warned_epoch_zero:
            _warn_epoch_zero()
        client_id = client_id_of(context)
        data: dict[str, Any] = {
            "round": server_round_of(msg) or 0,
            "client_id": client_id,
            "local_epoch": int(epoch),
            "metrics": metrics_of(metrics),
            "phase": msg.metadata.message_type.split(".", 1)[0],
            "node_id": str(context.node_id),
            **extra,
        }
        emitter_for(context, url).emit(
            "client_progress", data, run_id=str(context.run_id), role="client", client_id=client_id
        )
    except Exception:  # telemetry must not break training
        pass


_warned_epoch_zero = False


def _warn_epoch_zero() -> None:
    global _warned_epoch_zero
    _warned_epoch_zero = True
    FLOWER_LOG.warning(
        "fedrelay: report_epoch got epoch 0; epochs are counted from 1 (pass epoch + 1 from a "
        "0-based loop) so that they match FedRelayCallback's and the dashboard's"
    )


__all__ = [
    "CA_FILE_KEY",
    "REPLY_RECORD",
    "TOKEN_KEY",
    "URL_KEY",
    "ClientTelemetryMod",
    "InstrumentedStrategy",
    "client_id_of",
    "client_mod",
    "emitter_for",
    "fedrelay_mod",
    "instrument",
    "metrics_of",
    "relay_setting",
    "relay_url",
    "report_epoch",
    "server_round_of",
]
