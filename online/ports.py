"""Where a supervisor's workers listen: the shared serving port (chosen once, refused if
something already serves it) and each worker's own admin port."""

from __future__ import annotations

import socket

from online.config import ServeConfig
from towers.errors import ConfigError


def admin_port_for(base: int, *, workers: int, slot: int, held: set[int]) -> int:
    """Each worker answers for its own version, so each has its own admin port:
    ``base + slot``, or ``base + workers + slot`` while another worker of the slot (a
    recycle's predecessor still draining, or its replacement) holds the first (``held``:
    the ports the slot's live workers hold). ``base`` 0 gives every worker a free port, -1 none."""
    if base <= 0:
        return base
    first, second = base + slot, base + workers + slot
    return first if first not in held else second


def check_admin_ports(cfg: ServeConfig) -> None:
    """Workers use admin_port .. admin_port + 2N - 1: inside the port range, clear of the serving port."""
    if cfg.admin_port > 0:
        last = cfg.admin_port + 2 * cfg.workers.workers - 1
        if last > 65535:
            raise ConfigError("admin_port", f"{cfg.workers.workers} workers need ports up to {last} (> 65535)")
        if cfg.port and cfg.admin_port <= cfg.port <= last:
            raise ConfigError("admin_port", f"the workers' admin ports {cfg.admin_port}..{last} include port "
                              f"{cfg.port}")


def pick_port(host: str) -> int:
    """A free port chosen here, because every worker has to bind the same one."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on. The workers bind with SO_REUSEPORT, so a
    second ``serve --workers`` on a served port would not fail: the kernel would silently
    split the traffic between two deployments. A plain bind (SO_REUSEADDR only, so sockets in
    TIME_WAIT from a previous run do not count) fails if anything listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError("--port", f"{host}:{port} is already in use ({e.strerror}); is another twotower "
                                        "serve running there? Workers share a port with SO_REUSEPORT, so a "
                                        "second one would silently split its traffic") from e
