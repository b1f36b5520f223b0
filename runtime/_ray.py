"""Ray connection for `segclip-run --ray` and `segclip-serve --ray` (docs/ray.md; the optional
import rule of docs/architecture.md "Layout and packages").

`import_ray()` imports Ray or raises a one-line error with the install command. `ray_session`
joins the cluster at `address` (e.g. "auto", "ray://head:10001", "10.0.0.5:6379"), or, without
one, starts a Ray on this machine bound to 127.0.0.1 with no dashboard, and stops it on exit. A
Ray already initialised in this process (a notebook, a test) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from segclip.runtime.errors import BackendUnavailableError, RuntimeSegclipError

RAY_INSTALL = "pip install 'segclip[ray]'"
LOOPBACK = "127.0.0.1"


def import_ray() -> Any:
    """The `ray` module, or `BackendUnavailableError` naming the install command."""
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailableError(
            f"--ray needs Ray, which is not installed ({e}); install it with {RAY_INSTALL}"
        ) from e
    return ray


def _init_options(address: str | None, num_cpus: int | None, num_gpus: int | None,
                  ) -> dict[str, Any]:
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                               "include_dashboard": False}
    if address:
        options["address"] = address
        return options
    options.update(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus,
                   num_gpus=num_gpus)
    return options


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to a cluster (module docstring); disconnect on exit.

    Args:
        address: a Ray cluster to join; None starts a local Ray bound to 127.0.0.1.
        num_cpus, num_gpus: resources of the local Ray (default: this machine's); ignored
            when joining a cluster.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from this machine
    # Ray warns that token authentication is on: it is, and that is what a local Ray wants
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    try:
        ray.init(**_init_options(address, num_cpus, num_gpus))
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RuntimeSegclipError(
            f"cannot start or join {where} ({' '.join(str(e).split())}); check --address "
            f"(e.g. auto, or HOST:6379 of a running `ray start --head`)") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def unwrap_ray_error(error: BaseException) -> BaseException:
    """The user's error inside a Ray task error (its `cause`), else `error` itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error
