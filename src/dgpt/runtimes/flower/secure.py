"""Secure aggregation on Flower (`federation.secure_aggregation`): the aggregator learns only the weighted mean of a
round's updates, through Flower's SecAgg+.

Flower does the protocol: its `SecAggPlusWorkflow` on the ServerApp, its `secaggplus_mod` on the ClientApp. Each
oracle quantises its weighted update (`[secagg]`: clipped to [-c, c], T steps), adds a private mask and one pairwise
mask per neighbour (the pairs cancel in the sum) and secret-shares the seeds of both; the workflow sums the masked
vectors and, from the shares of the oracles that stayed, removes the masks: only the survivors' weighted sum appears,
which it divides by their summed weights. Both speak Flower's legacy layout, so this module translates: the request
rides in a FitIns (Theta as its parameters, every other record flattened into its config, with the oracle's weight),
the reply in a FitRes (the pseudo-gradient as its parameters, which the mod masks and then empties; the weight as
`num_examples`; metrics and the signed statement flattened into its metrics, which reach the aggregator as they are).
`MaskedRound` is the legacy Strategy the workflow drives: it hands out the FitIns and takes the unmasked mean.

Weights: an oracle's `num_examples` is its share of the round's mean (`Strategy.shares`) over the largest share, and
Flower's `max_weight` is 1, so the largest weight is quantised to the whole range. The mean then differs from the exact
weighted mean (with the weights as quantised, round(w T) / T) by less than n (2c / T) / sum_j w_j in every coordinate
(`mean_error_bound`): each of n oracles' stochastic rounding is off by under one step 2c/T, unbiased.
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from dgpt.config import Config, SecAggConfig
from dgpt.errors import DgptError
from dgpt.runtimes.flower import wire

logger = logging.getLogger(__name__)
_MASKING: ContextVar[bool] = ContextVar("dgpt_secagg_masking", default=False)
WEIGHT = "weight"  # the request's `round` field with the oracle's weight, and the reply's metric echoing it


# --- the ClientApp's side --------------------------------------------------------------------------------------------

def secure_mod(message: Message, context: Context, call_next):
    """Flower's secaggplus_mod for the train messages of its workflow; every other message goes straight through."""
    if message.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)

    def masked(inner: Message, ctxt: Context) -> Message:
        token = _MASKING.set(True)
        try:
            return call_next(inner, ctxt)
        finally:
            _MASKING.reset(token)

    return secaggplus_mod(message, context, masked)


def masking() -> bool:
    """Whether this call runs inside SecAgg+'s masking stage: its reply leaves the SuperNode only masked."""
    return _MASKING.get()


def open_fitins(message: Message) -> None:
    """The FitIns a SecAgg+ train message carries, made dgpt's request again (in place)."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != 1 or arrays[0].dtype != np.float32:
        raise DgptError("the server's secure-aggregation message holds no float32 Theta")
    content = _records(fitins.config)
    content["theta"] = wire.theta_record(torch.from_numpy(arrays[0].reshape(-1).copy()))
    message.content = content


def masked_metrics(message: Message, delta: torch.Tensor, sa: SecAggConfig) -> dict[str, float]:
    """What a reply to be masked adds to its metrics (nothing outside SecAgg+): the weight the server gave this oracle's
    update (its share over the largest), and how many coordinates of the weighted update SecAgg+ will clip to
    [-clipping_range, clipping_range] (which biases the mean: warned)."""
    if not masking():
        return {}
    asked = message.content.config_records.get("round")
    weight = asked.get(WEIGHT) if asked is not None else None
    if not isinstance(weight, float) or not 0 < weight <= 1:
        raise DgptError(f"the server's secure-aggregation message gives this oracle the weight {weight!r}; expected a float in (0, 1]")
    clipped = int((delta.abs() * weight > sa.clipping_range).sum())
    if clipped:
        logger.warning(f"{clipped} coordinates of this oracle's weighted update are beyond secagg.clipping_range "
                       f"{sa.clipping_range:g} and are clipped: the mean is biased (raise the range)")
    return {WEIGHT: weight, "secagg_clipped": float(clipped)}


def as_fitres(reply: RecordDict) -> RecordDict:
    """dgpt's train reply in the FitRes layout secaggplus_mod masks: the pseudo-gradient as its parameters, the weight as
    num_examples. A refusal raises (there is no update to mask): Flower answers the workflow with the error."""
    reason = wire.refusal_reason(reply)
    if reason is not None:
        raise DgptError(reason)
    delta, problem = wire.from_array(reply.array_records["delta"]["values"])
    if problem or delta.dtype != torch.float32:
        raise DgptError(f"this oracle's update cannot be masked: {problem or delta.dtype}")
    metrics = reply.metric_records["metrics"]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta.numpy()]), metrics[WEIGHT], _flat(reply))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


# --- the ServerApp's side --------------------------------------------------------------------------------------------

@dataclass
class Masked:
    """What a secure round brought back: each SuperNode's reply without its update (dgpt's layout), the bytes of its
    masked vector, and the mean of the updates of those that stayed (None, with `problem`, when there is none)."""

    contents: dict[int, RecordDict] = field(default_factory=dict)
    nbytes: dict[int, int] = field(default_factory=dict)
    mean: torch.Tensor | None = None
    problem: str = ""
    failures: list[str] = field(default_factory=list)


class MaskedRound(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow drives for one round: `configure_fit` gives each asked SuperNode the
    round's request and its oracle's weight; `aggregate_fit` receives the unmasked mean (as every reply's parameters)
    and each reply's metrics."""

    def __init__(self, grid, request: RecordDict, nodes: dict[int, str], weights: dict[str, float]):
        self.grid, self.config, self.nodes, self.weights = grid, _flat(request), nodes, weights
        self.results: list[tuple[int, FitRes]] | None = None  # None: the workflow halted before unmasking
        self.failures: list[str] = []

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), FitIns(parameters, {**self.config, f"c.round.{WEIGHT}": self.weights[name]}))
                for node, name in self.nodes.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = [(proxy.node_id, res) for proxy, res in results]
        self.failures = [str(f) for f in failures]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Counted:
    """The Grid as the workflow uses it, counting the bytes of each SuperNode's masked vector as they arrive."""

    def __init__(self, grid):
        self.grid, self.nbytes = grid, {}

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            record = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if record is not None and Key.MASKED_PARAMETERS in record:
                self.nbytes[reply.metadata.src_node_id] = sum(len(b) for b in record[Key.MASKED_PARAMETERS])
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def relative_weights(shares: dict[str, float]) -> dict[str, float]:
    """Each oracle's share over the largest: the weights SecAgg+ quantises (max_weight 1)."""
    top = max(shares.values())
    return {n: float(s / top) for n, s in shares.items()}


def quantised(weights: list[float], sa: SecAggConfig) -> list[float]:
    """The weights as SecAgg+ applies them: round(w T) / T."""
    return [round(w * sa.quantization_range) / sa.quantization_range for w in weights]


def mean_error_bound(weights: list[float], sa: SecAggConfig) -> float:
    """The most any coordinate of the unmasked mean differs from the weighted mean with the quantised weights (module
    docstring): n stochastic roundings of under one step 2c/T each, over the summed weights."""
    return len(weights) * 2 * sa.clipping_range / sa.quantization_range / sum(quantised(weights, sa))


def masked_mean(grid, rnd: int, request: RecordDict, theta: torch.Tensor, nodes: dict[int, str], shares: dict[str, float],
                config: Config) -> Masked:
    """One round of SecAgg+ over the SuperNodes `nodes` (id -> oracle) with the oracles' `shares` of the mean."""
    sa, weights = config.secagg, relative_weights(shares)
    strategy, counted = MaskedRound(grid, request, nodes, weights), _Counted(grid)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([theta.numpy()]), True)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    workflow = SecAggPlusWorkflow(sa.num_shares, sa.reconstruction_threshold, max_weight=1.0,
                                  clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
                                  modulus_range=sa.modulus_range, timeout=config.federation.round_timeout_s)
    workflow(counted, context)
    masked = Masked(nbytes=dict(counted.nbytes), failures=strategy.failures)
    if strategy.results is None:
        masked.problem = ("SecAgg+ did not unmask a sum (fewer than 2 oracles replied, or fewer than "
                          "secagg.reconstruction_threshold of an oracle's neighbours stayed)")
        return masked
    for node, res in strategy.results:
        masked.contents[node] = _records(res.metrics)
        if res.num_examples != weights[nodes[node]]:
            masked.problem = (f"oracle '{nodes[node]}' weighted its update {res.num_examples!r}, not the "
                              f"{weights[nodes[node]]!r} it was given")
    if strategy.results and not masked.problem:
        masked.mean, masked.problem = _checked_mean(strategy.results[0][1], [weights[nodes[n]] for n, _ in strategy.results], sa)
    return masked


def _checked_mean(res: FitRes, weights: list[float], sa: SecAggConfig) -> tuple[torch.Tensor | None, str]:
    """The unmasked mean, if it is one vector within the range the quantisation allows: each oracle's weighted update
    lies in [-c, c], so a mean beyond n c / sum(weights) means the masks did not come off."""
    arrays = parameters_to_ndarrays(res.parameters)
    if len(arrays) != 1:
        return None, f"the unmasked sum holds {len(arrays)} arrays, not 1"
    mean = np.asarray(arrays[0], dtype=np.float64).reshape(-1)
    bound = len(weights) * sa.clipping_range * (1 + 2 / sa.quantization_range) / sum(quantised(weights, sa))
    if not np.isfinite(mean).all() or np.abs(mean).max(initial=0.0) > bound * (1 + 1e-9):
        return None, f"the unmasked mean is not finite or beyond +-{bound:.3g}: the masks did not come off"
    return torch.from_numpy(mean).float(), ""


def _flat(content: RecordDict) -> dict:
    """The config and metric records of `content` as one dict of scalars ('c.RECORD.KEY', 'm.RECORD.KEY')."""
    flat = {f"c.{name}.{k}": v for name, record in content.config_records.items() for k, v in record.items()}
    return flat | {f"m.{name}.{k}": v for name, record in content.metric_records.items() for k, v in record.items()}


def _records(flat: dict) -> RecordDict:
    """`_flat` undone (keys of another form are left out)."""
    found: dict[tuple[str, str], dict] = {}
    for key, value in flat.items():
        kind, _, rest = key.partition(".")
        name, _, inner = rest.partition(".")
        if kind in ("c", "m") and name and inner:
            found.setdefault((kind, name), {})[inner] = value
    content = RecordDict()
    for (kind, name), values in found.items():
        content[name] = ConfigRecord(values) if kind == "c" else MetricRecord(values)
    return content
