"""keel.agent: one pluggable guest agent, its controller client and one versioned protocol.

The agent (``keel agent run``) runs in the guest and serves plugins over virtio-serial, vsock,
TCP with mutual TLS or a unix socket. `AgentClient` drives it, and qemu-guest-agent too, with
one async API. The guest is untrusted: the client bounds memory and time against any peer.
The protocol is described in docs/agent-protocol.md.
"""

from keel.agent._agent import Agent, AgentConfig
from keel.agent._client import AgentClient, listen_for_agents
from keel.agent._plugin import ENTRY_POINT_GROUP, CommandContext, Plugin, command
from keel.agent._protocol import PROTOCOL_VERSIONS
from keel.agent._types import ExecResult, FileInfo

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROTOCOL_VERSIONS",
    "Agent",
    "AgentClient",
    "AgentConfig",
    "CommandContext",
    "ExecResult",
    "FileInfo",
    "Plugin",
    "command",
    "listen_for_agents",
]
