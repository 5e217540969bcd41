"""uvicorn's httptools protocol, with a way for the application to drop a connection at once.

ASGI gives an application no way to abort its connection: it can only stop sending. A streamed
answer whose client stopped reading (see `server/streaming.WatchedStream`) would then leave
uvicorn closing the transport gracefully, which waits, with the answer's unsent bytes, for a reader
that never comes, and logs "ASGI callable returned without completing response" as an error.
This protocol puts a `reset` of the connection in each request's scope, under
`scope["extensions"]["charter.abort"]`: the unsent bytes are dropped, the client gets a TCP reset
(not a FIN that could pass for the end of the answer), and uvicorn sees a client that went away.
"""

from __future__ import annotations

import socket
import struct

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from charter.server.streaming import ABORT
_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and drops what is unsent


class AbortableHttpToolsProtocol(HttpToolsProtocol):
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {ABORT: self._reset}  # type: ignore[typeddict-unknown-key]

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        try:
            if sock is not None and sock.fileno() >= 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        except (OSError, ValueError):  # gone already (uvloop: a negative descriptor)
            pass
        self.transport.abort()
