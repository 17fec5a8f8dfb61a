"""Run the app under uvicorn, with a SIGTERM drain that ends in exit status 0.

On SIGTERM (or Ctrl+C) /readyz turns 503, uvicorn stops accepting connections and waits for the
in-flight requests, the batcher finishes its queue, and the process exits 0. (uvicorn itself
re-raises the signal after its graceful shutdown, which would make every orderly stop look like a
crash to a supervisor; the orderly stop is this server's normal end.)
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Generator
from types import FrameType
from typing import Any

from glit_deploy.serve.app import ServerState

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        from glit_deploy.errors import GlitError

        raise GlitError("serving needs the serve extra: pip install 'glit-deploy[serve]'") from None
    return uvicorn


def run_server(app: Any, state: ServerState, host: str = "127.0.0.1", port: int = 8000,
               graceful_timeout_s: float = 30.0, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    uvicorn = _uvicorn()

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state.start_draining()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    # httptools and uvloop when installed (uvicorn's "auto"), else h11 and asyncio
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_timeout_s, lifespan="on", server_header=False)
    DrainingServer(config).run()
