"""The ServerApp's side of the conversation with the SuperNodes: which SuperNode answers for which oracle, a request
sent to the oracles asked (and to SuperNodes not met yet), and its replies collected until every oracle answered or
the round closes. Every reply is checked before it is kept (its round, its oracle, the numbers its message type
needs); what a peer says about itself is never taken on trust beyond that."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from dgpt.config import FederationConfig
from dgpt.runtimes.flower import wire

logger = logging.getLogger(__name__)
POLL_S = 0.05  # the ServerApp's wait between asking the SuperLink for replies
_NEEDED = {wire.TRAIN: ("size", "tokens", "train_loss"), wire.EVALUATE: ("size",), wire.MODEL: ("size",),
           wire.CANDIDATES: ("size",)}


@dataclass
class Replies:
    """What one round's messages brought back, by oracle."""

    contents: dict[str, RecordDict] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # oracle -> why its reply was not used
    seconds: float = 0.0  # from sending to the last reply taken


class Exchange:
    def __init__(self, fed: FederationConfig, grid: Grid):
        self.fed, self.grid = fed, grid
        self.node_of: dict[str, int] = {}  # oracle -> the SuperNode that last answered for it
        self.met: set[int] = set()  # every SuperNode that ever answered
        self.told: dict[str, str] = {}  # oracle -> the hash of the newest ledger head it answered a message with
        self.reports: dict[str, list[dict]] = {}  # each oracle's signed loss reports since the ledger took them

    def live(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def wait_for_nodes(self, want: int) -> None:
        """Until `want` SuperNodes are connected, or `min_oracles` are once round_timeout_s passed."""
        deadline = time.monotonic() + self.fed.round_timeout_s
        while True:
            count = len(self.live())
            if count >= want or (count >= self.fed.min_oracles and time.monotonic() > deadline):
                logger.info(f"{count} SuperNode(s) connected; {want} oracle(s) declared")
                return
            time.sleep(POLL_S)

    def ask(self, content: RecordDict, asked: dict[str, str], kind: str, rnd: int, head: dict | None) -> Replies:
        """Send `content` to the SuperNode of every oracle `asked` (oracle -> message type) and, as `kind`, to the
        SuperNodes not met yet; collect the replies until every oracle asked answered (a SuperNode it left behind, or
        a stranger, is not waited for) or round_timeout_s passed with min_oracles answers. `head`: the ledger head
        the content carries, which every oracle that answered now holds."""
        replies, live = Replies(), self.live()
        to = {self.node_of[n]: k for n, k in asked.items() if self.node_of.get(n) in live}
        to.update({node: kind for node in sorted(live - self.met)})
        sent = [Message(content, dst_node_id=node, message_type=k, group_id=str(rnd)) for node, k in to.items()]
        t0 = time.monotonic()
        waiting = dict(zip(self.grid.push_messages(sent), to))  # message id -> SuperNode
        deadline = t0 + self.fed.round_timeout_s
        while waiting and len(replies.contents) + len(replies.refused) < len(asked):
            if time.monotonic() > deadline and len(replies.contents) >= self.fed.min_oracles:
                break  # the round closes without the late
            for reply in self.grid.pull_messages(list(waiting)):
                self.take(reply, waiting.pop(reply.metadata.reply_to_message_id), rnd, asked, replies)
            time.sleep(POLL_S if waiting else 0)
        if head is not None:
            self.told.update(dict.fromkeys(replies.contents, head["hash"]))
        replies.seconds = time.monotonic() - t0
        return replies

    def take(self, reply: Message, node: int, rnd: int, asked: dict[str, str], replies: Replies) -> None:
        if reply.has_error():
            logger.warning(f"round {rnd}: SuperNode {node} ({self._known(node)}) failed: {reply.error.reason}")
        else:
            self.keep(reply.content, node, rnd, asked, replies)

    def keep(self, content: RecordDict, node: int, rnd: int, asked: dict[str, str], replies: Replies) -> None:
        """Keep a reply if it answers this round for an oracle that was asked (`asked`: oracle -> message type) and has
        not answered yet, with the metrics its message type needs as finite numbers (and a positive size); keep its
        signed loss report for the ledger's next record."""
        said = content.config_records.get("round")
        name = said.get("oracle") if said is not None else None
        refused = wire.refusal_reason(content)
        if refused is not None:
            name = name or self._known(node)
            logger.warning(f"round {rnd}: oracle '{name}' (SuperNode {node}) cannot take part: {refused}")
            if name in asked and name not in replies.contents:
                replies.refused[name] = f"its ClientApp could not take part: {refused}"
        elif said is None or said.get("round") != rnd:
            logger.warning(f"round {rnd}: refused a reply from SuperNode {node} made for round {said and said.get('round')}")
        elif name not in asked:
            logger.warning(f"round {rnd}: refused a reply from SuperNode {node}: {name!r} is not an oracle asked this round")
        elif not _has_numbers(content, _NEEDED[asked[name]]):
            logger.warning(f"round {rnd}: refused the reply for oracle '{name}': it lacks finite {', '.join(_NEEDED[asked[name]])}")
        elif name in replies.contents:
            logger.warning(f"round {rnd}: refused a second reply for oracle '{name}' (SuperNode {node})")
        else:
            if self.node_of.get(name, node) != node:
                logger.info(f"oracle '{name}' now answers from SuperNode {node}")
            self.node_of[name] = node
            self.met.add(node)
            replies.contents[name] = content
            if signed_report(content) is not None:
                self.reports.setdefault(name, []).append(signed_report(content))

    def take_reports(self) -> dict[str, list[dict]]:
        """The signed loss reports kept since the last call (each evaluation's reply brought one)."""
        reports, self.reports = self.reports, {}
        return reports

    def silence(self, name: str) -> str:
        """Why an oracle that gave no reply may have been silent."""
        node = self.node_of.get(name)
        if node is not None and node not in self.live():
            return (f"no reply; its SuperNode {node} left (one restarted within a minute of being killed is refused by "
                    "the SuperLink and exits with code 305: start it again after a minute)")
        return "no reply in time"

    def _known(self, node: int) -> str:
        known = [n for n, id_ in self.node_of.items() if id_ == node]
        return known[0] if known else "not met yet"


def signed_report(content: RecordDict) -> dict | None:
    """A reply's signed report of the losses it gave (None: it sent none)."""
    return dict(content.config_records["report"]) if "report" in content.config_records else None


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _has_numbers(content: RecordDict, keys: tuple[str, ...]) -> bool:
    metrics = content.metric_records.get("metrics")
    return metrics is not None and all(finite(metrics.get(k)) for k in keys) and metrics["size"] > 0
