"""Turn the bytes of a streamed completion into the ``Completion`` a non-streamed reply gives.

Sans-IO: no sockets, no asyncio, no clock. ``SSEParser`` cuts bytes into event payloads by the
WHATWG server-sent events rules; ``StreamAssembler`` folds OpenAI ``chat.completion.chunk`` and
``text_completion`` payloads (and vLLM's additions) into a ``records.Completion``. The caller
reads the network and feeds them::

    for payload in parser.feed(data):
        assembler.add(payload)
    ...
    completion = assembler.completion()

Errors, all ``ValueError`` because each says the bytes were not a good answer::

    StreamError              bad framing, invalid JSON, a chunk of the wrong shape
    ├── StreamIncomplete     the stream ended before the completion did
    └── StreamServerError    the server reported an error inside the stream
"""

from asyncgen.core.sse.assembler import StreamAssembler
from asyncgen.core.sse.errors import StreamError, StreamIncomplete, StreamServerError
from asyncgen.core.sse.parser import SSEParser

__all__ = [
    "SSEParser",
    "StreamAssembler",
    "StreamError",
    "StreamIncomplete",
    "StreamServerError",
]
