"""The mock node agent on the bus: register nodes, consume their allocations, answer ready.

One process may host many mock nodes. Each is registered (``NodeDevices``) under its key in
``<prefix>-nodes``. Allocations reach the agent through one durable JetStream pull consumer
on the ``<prefix>-alloc`` stream, named after the agent, so what was decided while the
agent was down is delivered when it comes back: the per-node ``decided`` and ``released``
subjects of its nodes when it hosts a few, the wildcards (skipping other agents' nodes)
when it hosts many. For each ``Placement`` it answers ``Ready`` (with the slice's
environment) on ``<prefix>.alloc.<node>.ready``; a malformed message is logged, answered
``Failed`` when its node is known, and acknowledged so it is not redelivered forever.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.js import JetStreamContext, api

from libshared import events
from libshared.connecting import Bus
from libshared.devices import NodeDevices
from libshared.subjects import Subjects
from services.nodeagent.core import environments

log = logging.getLogger("vslice.nodeagent")

PER_NODE_FILTERS = 32  # above this many hosted nodes, filter by wildcard instead
FETCH_BATCH = 128


@dataclass
class Agent:
    """Hosts ``nodes``; ``prepared`` maps each pod UID it made ready to its ``Ready``."""

    js: JetStreamContext
    bus: Bus
    subjects: Subjects
    name: str
    nodes: list[NodeDevices]
    prepared: dict[str, events.Ready] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    @property
    def durable(self) -> str:
        """The durable consumer's name."""
        return f"nodeagent-{self.name}"

    async def register(self) -> None:
        """Write every hosted node's ``NodeDevices`` into the nodes bucket."""
        for node in self.nodes:
            await self.bus.nodes.put(node.node, events.ENCODER.encode(node))
        log.info("registered", extra={"nodes": len(self.nodes)})

    def _filters(self) -> list[str]:
        s = self.subjects
        if len(self.nodes) > PER_NODE_FILTERS:
            return [f"{s.prefix}.alloc.*.decided", f"{s.prefix}.alloc.*.released"]
        return [f(n.node) for n in self.nodes for f in (s.alloc_decided, s.alloc_released)]

    async def start(self) -> None:
        """Create (or reuse) the durable consumer and start consuming."""
        config = api.ConsumerConfig(
            durable_name=self.durable,
            filter_subjects=self._filters(),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=30.0,
        )
        sub = await self.js.pull_subscribe(
            "", durable=self.durable, stream=self.subjects.alloc_stream, config=config
        )
        self._task = asyncio.create_task(self._consume(sub))

    async def stop(self) -> None:
        """Stop consuming (unacknowledged messages are redelivered to the next start)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        hosted = {n.node for n in self.nodes}
        prefix = self.subjects.prefix
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("fetch failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                parts = msg.subject.split(".")
                node = parts[2] if len(parts) == 4 and msg.subject.startswith(prefix) else ""
                if node in hosted:
                    await self._handle(node, msg.data)
                try:
                    await msg.ack()
                except nats.errors.Error as exc:
                    log.warning("ack failed", extra={"error": str(exc)})

    async def _handle(self, node: str, data: bytes) -> None:
        try:
            event = events.ALLOC_EVENT.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("malformed allocation", extra={"node": node, "error": str(exc)})
            return
        if isinstance(event, events.Release):
            self.prepared.pop(event.pod_uid, None)
            return
        answer: events.Ready | events.Failed
        if event.node != node:
            answer = events.Failed(
                pod_uid=event.pod_uid, node=node, reason=f"placement names node {event.node!r}"
            )
            subject = self.subjects.alloc_failed(node)
        else:
            answer = events.Ready(pod_uid=event.pod_uid, node=node, env=environments.pod_env(event))
            self.prepared[event.pod_uid] = answer
            subject = self.subjects.alloc_ready(node)
        try:
            await self.js.publish(subject, events.ENCODER.encode(answer))
        except (nats.errors.Error, TimeoutError) as exc:
            log.error("answer failed", extra={"node": node, "error": str(exc)})
