"""What the gateway and the workers share: message types, the codec and socket addresses."""

from protocol.codec import ProtocolError, decode, encode
from protocol.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Delta,
    Error,
    Finished,
    Generate,
    Heartbeat,
    Message,
    Output,
    Ready,
    SamplingParams,
    ToolCall,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Accepted",
    "Cancel",
    "Delta",
    "Error",
    "Finished",
    "Generate",
    "Heartbeat",
    "Message",
    "Output",
    "ProtocolError",
    "Ready",
    "SamplingParams",
    "ToolCall",
    "decode",
    "encode",
]
