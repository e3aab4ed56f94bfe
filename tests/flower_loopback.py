"""A Flower Grid that hands each message to the real ClientApp of its node, in this process.

The ServerApp (:func:`cmrfed.fed.flower_server.serve`) and the ClientApp handlers run unchanged on
real Flower Messages and records; only the network between them is replaced by a function call,
as Flower's own simulation runtime does. The loopback SuperLink tests (tests/test_flower.py) cover
the network; this lets a test compare the engines for every method in seconds. A node can be taken
down (its messages fail as a SuperLink reports an offline node) and brought back under a new id,
as a restarted SuperNode is.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from cmrfed.fed.flower_client import client_app

OFFLINE = 1  # an error code, as Flower's SuperLink reports an unreachable node


def as_serverapp() -> None:
    """Who is sending: what a ServerApp process is told when Flower starts it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


class LoopbackGrid(Grid):
    """Nodes are site node configs; a message is executed when it is pushed, unless it expired."""

    def __init__(self, node_configs: Iterable[dict]) -> None:
        as_serverapp()
        self._ids = itertools.count(101)
        self.nodes: dict[int, dict] = {next(self._ids): dict(c) for c in node_configs}
        self.offline: set[int] = set()
        self.replies: dict[str, Message] = {}
        self.executed: list[tuple[int, str]] = []  # (node, message type) of every message run
        self.ttls: list[float] = []  # the TTL of every message pushed

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.nodes if node not in self.offline]

    def restart(self, node: int) -> int:
        """The node's SuperNode is restarted with the same node config: a new id."""
        config = self.nodes.pop(node)
        self.offline.discard(node)
        new = next(self._ids)
        self.nodes[new] = config
        return new

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.ttls.append(message.metadata.ttl)
            ids.append(message.metadata.message_id)
            self.replies[message.metadata.message_id] = self._deliver(message)
        return ids

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node in self.offline or node not in self.nodes:
            return Message(Error(code=OFFLINE, reason="node offline"), reply_to=message)
        context = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(),
                          run_config={})
        self.executed.append((node, message.metadata.message_type))
        try:
            return client_app(message, context)
        except Exception as exc:  # a ClientApp that raises replies with an error
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        time.sleep(0)
        return self.pull_messages(ids)
