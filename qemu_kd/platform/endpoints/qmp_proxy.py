"""The host-facing QMP endpoint of a domain: a filtering QMP proxy.

The proxy speaks real QMP to its clients (greeting, ``qmp_capabilities``
negotiation, ``id`` echo, ``return``/``error`` replies, events), so qmp-shell
and the qemu.qmp clients work against it unchanged.  Behind it sits one QMP
connection to QEMU's host monitor (a :class:`qemu.qmp.QMPClient`).  What
passes is an allow-list that depends on the domain's measured policy
(docs/debugging.md):

* always: status and identity queries, ``stop``/``cont`` (through the
  platform's exit/resume when callbacks are given), ``system_powerdown`` and
  ``quit`` (the host can end its own QEMU process anyway), and the HMP lines
  of the allow-list in :mod:`~qemu_kd.platform.endpoints.allowlists` that
  reveal nothing (``info status`` ...) or are run control (``stop``/``cont``);
* with DEBUG also: commands that read guest memory or state
  (``pmemsave``, ``memsave``, ``dump-guest-memory``, every ``query-*``, and
  the HMP allow-list's ``info`` subcommands and ``x``/``xp``), each one audited.

Everything else, including commands QEMU does not know, is answered with a
``GenericError`` that names the policy and is never forwarded.  Malformed input
gets the error a real QEMU monitor gives; a message larger than
:data:`MAX_MESSAGE` closes that client.  No client can stop the proxy or the
domain by misbehaving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, QMPError
from qemu.qmp.qmp_client import BadReplyError

from qemu_kd.platform.endpoints.audit import AuditError, AuditLog
from qemu_kd.common.errors import KdError
from qemu_kd.platform.endpoints.allowlists import HmpAction, judge_hmp
from qemu_kd.common.files import claim_socket_path

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20          # bytes in one client message
MAX_NESTING = 256              # JSON nesting depth in one client message
UPSTREAM_LIMIT = 64 << 20      # one reply line from QEMU (query-qmp-schema is ~0.5 MiB)
MAX_CLIENT_BACKLOG = 8 << 20   # unsent bytes to a client before it is dropped
DISCARD_LIMIT = 16 << 20       # input still read from a client being closed after an error
DISCARD_WAIT = 2.0             # seconds to wait for more of that input

ALWAYS_ALLOWED = frozenset({
    "query-status", "query-version", "query-name", "query-commands", "query-cpus-fast",
    "query-kvm", "query-uuid", "query-target", "stop", "cont", "system_powerdown", "quit",
})
DEBUG_ALLOWED = frozenset({"pmemsave", "memsave", "dump-guest-memory", "human-monitor-command"})
DEBUG_ALLOWED_PREFIXES = ("query-", "x-query-")
CPU_FIELDS = frozenset({"cpu-index", "qom-path", "thread-id", "target", "props"})
# Events a host sees without DEBUG, with the data members it may see.
HARMLESS_EVENTS = {
    "STOP": (), "RESUME": (), "RESET": ("guest", "reason"), "SHUTDOWN": ("guest", "reason"),
    "POWERDOWN": (), "SUSPEND": (), "WAKEUP": (), "GUEST_PANICKED": ("action",),
}


class QmpProxyError(KdError):
    """The QMP proxy cannot start or lost its connection to QEMU."""


def error_reply(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}


# -- input framing ----------------------------------------------------------------------------

@dataclass
class InputError:
    """A client message that could not be parsed; ``fatal`` closes the client."""

    desc: str
    fatal: bool = False


class QmpInputSplitter:
    """Cuts a client's byte stream into JSON values the way QEMU's streamer does.

    Values need not be line-separated.  :meth:`feed` returns parsed objects
    (anything JSON) and :class:`InputError` items, in input order.
    """

    _WHITESPACE = b" \t\r\n"
    _STRUCTURAL = b"{}[],:\""

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING):
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False       # inside a top-level bare token (number, keyword)
        self._garbage = False    # the last item was a stray-byte error
        self.broken = False      # a fatal error was reported; feed nothing more

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._bare = False

    def _finish(self, out: list) -> None:
        raw = bytes(self._buf)
        self._reset()
        self._garbage = False
        try:
            out.append(json.loads(raw))
        except RecursionError:
            out.append(InputError("JSON parse error, nesting too deep"))
        except ValueError as exc:
            reason = getattr(exc, "msg", None) or str(exc)
            out.append(InputError(f"JSON parse error, {reason[:100]}"))

    def _stray(self, out: list, byte: int) -> None:
        self._reset()
        if not self._garbage:
            out.append(InputError(f"JSON parse error, stray byte 0x{byte:02x}"))
            self._garbage = True

    def feed(self, data: bytes) -> list:
        out: list = []
        if self.broken:
            return out
        for byte in data:
            if byte in (0xFE, 0xFF) or (byte < 0x20 and byte not in self._WHITESPACE):
                self._stray(out, byte)   # like QEMU, these bytes resynchronise the parser
                continue
            if self._bare:
                if byte in self._WHITESPACE or byte in self._STRUCTURAL:
                    self._finish(out)
                else:
                    self._buf.append(byte)
                    if len(self._buf) > self.max_message:
                        return self._fatal(out)
                    continue
            if not self._buf:
                if byte in self._WHITESPACE:
                    continue
                self._garbage = False
                if byte in b"}]":
                    out.append(InputError("JSON parse error, expecting value"))
                    continue
                self._buf.append(byte)
                if byte in b"{[":
                    self._depth = 1
                elif byte == ord('"'):
                    self._in_string = True
                elif byte in b",:":
                    self._finish(out)
                else:
                    self._bare = True
                continue
            self._buf.append(byte)
            if len(self._buf) > self.max_message:
                return self._fatal(out)
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == ord("\\"):
                    self._escape = True
                elif byte == ord('"'):
                    self._in_string = False
                    if self._depth == 0:
                        self._finish(out)
                continue
            if byte == ord('"'):
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
                if self._depth > self.max_nesting:
                    self.broken = True
                    out.append(InputError(f"JSON nesting deeper than {self.max_nesting} levels; "
                                          "closing the connection", fatal=True))
                    return out
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    self._finish(out)
        return out

    def _fatal(self, out: list) -> list:
        self.broken = True
        out.append(InputError(f"QMP message larger than {self.max_message} bytes; "
                              "closing the connection", fatal=True))
        return out


# -- policy -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What the proxy does with one command; ``run_control`` is ``stop``/``cont`` when it
    goes through the platform's exit/resume (QMP ``stop``/``cont`` and their HMP lines)."""

    allowed: bool
    audited: bool
    reason: str = ""
    run_control: str = ""


class QmpPolicy:
    """The allow-list for one domain (see the module docstring)."""

    def __init__(self, debug: bool, domain: str):
        self.debug = debug
        self.domain = domain

    def refusal(self, command: str, shown: str | None = None) -> str:
        what = shown or f"'{command[:80]}'"
        if self.debug:
            return (f"{what} is refused: it is not available on the host QMP endpoint of "
                    f"key domain {self.domain}, even with the DEBUG policy")
        return f"{what} is refused: key domain {self.domain} was not sealed with the DEBUG policy"

    def debug_only(self, command: str) -> bool:
        return command in DEBUG_ALLOWED or command.startswith(DEBUG_ALLOWED_PREFIXES)

    def allows(self, command: str) -> bool:
        return command in ALWAYS_ALLOWED or (self.debug and self.debug_only(command))

    def judge(self, command: str, arguments: dict) -> Verdict:
        if command in ("stop", "cont"):
            return Verdict(True, False, run_control=command)
        if command in ALWAYS_ALLOWED:
            return Verdict(True, False)
        if command == "human-monitor-command":
            return self.judge_hmp(arguments.get("command-line"))
        if self.debug and self.debug_only(command):
            return Verdict(True, True)
        return Verdict(False, True, self.refusal(command))

    def judge_hmp(self, line) -> Verdict:
        """``human-monitor-command``: the HMP allow-list (allowlists.judge_hmp)."""
        hmp = judge_hmp(line, debug=self.debug)
        if hmp.action is HmpAction.HARMLESS:
            return Verdict(True, False)
        if hmp.action in (HmpAction.STOP, HmpAction.CONT):
            return Verdict(True, self.debug, run_control=hmp.action.value)
        if hmp.action is HmpAction.INSPECT:
            return Verdict(True, True)
        if not self.debug and isinstance(line, str):
            shown = f"human-monitor-command '{line[:60]}'"
        else:
            shown = f"human-monitor-command '{hmp.command[:40]}'"
        return Verdict(False, True, self.refusal("human-monitor-command", shown))

    def filter_result(self, command: str, result):
        """Drop what the host may not see from an allowed command's return value."""
        if command == "query-cpus-fast" and isinstance(result, list):
            return [{k: v for k, v in cpu.items() if k in CPU_FIELDS}
                    for cpu in result if isinstance(cpu, dict)]
        if command == "query-commands" and isinstance(result, list):
            return [c for c in result if isinstance(c, dict) and self.allows(str(c.get("name")))]
        return result

    def filter_event(self, event: dict) -> dict | None:
        if self.debug:
            return event
        name = event.get("event")
        if name not in HARMLESS_EVENTS:
            return None
        out = {"event": name}
        data = event.get("data")
        if isinstance(data, dict):
            out["data"] = {k: v for k, v in data.items() if k in HARMLESS_EVENTS[name]}
        if "timestamp" in event:
            out["timestamp"] = event["timestamp"]
        return out


def summarize(command: str, arguments: dict) -> str:
    """The audit summary of a command: its name and arguments."""
    if not arguments:
        return command
    return f"{command} {json.dumps(arguments, sort_keys=True, separators=(',', ':'))}"


# -- the upstream connection ------------------------------------------------------------------

class _EventForwarder(EventListener):
    """Hands every event from QEMU straight to ``on_event``.

    A plain :class:`EventListener` queues events and keeps each one in its history
    for as long as it lives; the proxy forwards them at once and keeps none.
    """

    def __init__(self, on_event: Callable[[dict], None]):
        super().__init__()
        self.on_event = on_event

    async def put(self, event: Message) -> None:
        if self.accept(event):
            self.on_event(dict(event))


class _Upstream:
    """The connection to QEMU's host monitor: a :class:`qemu.qmp.QMPClient`."""

    def __init__(self, path: str, on_event: Callable[[dict], None], not_running: str,
                 name: str):
        self.path = path
        self.not_running = not_running
        self.client = QMPClient(name, readbuflen=UPSTREAM_LIMIT)
        # The client's default listener (which cannot be removed) would queue and
        # remember every event, unread: it accepts none.
        self.client.events.event_filter = lambda _event: False
        self.client.register_listener(_EventForwarder(on_event))

    async def connect(self) -> None:
        await self.client.connect(self.path)

    @property
    def version(self) -> dict:
        greeting = self.client.greeting
        return dict(greeting.QMP.version) if greeting is not None else {}

    async def execute(self, command: str, arguments: dict | None) -> dict:
        """QEMU's reply (with ``return`` or ``error``) to one command."""
        try:
            result = await self.client.execute(command, arguments or None)
        except ExecuteError as exc:
            return {"error": {"class": exc.error_class, "desc": str(exc)}}
        except BadReplyError:
            return error_reply(f"QEMU gave a malformed reply to '{command}'")
        except (QMPError, OSError) as exc:
            # Not connected any more (StateError) or cut off mid-command.
            log.info("QMP upstream %s: %s failed: %s", self.path, command,
                     type(exc).__name__)
            return error_reply(self.not_running)
        return {"return": result}

    async def close(self) -> None:
        try:
            await self.client.disconnect()
        except Exception as exc:  # noqa: BLE001 - what ended the connection; closing anyway
            log.debug("QMP upstream %s: disconnect: %s", self.path, exc)


# -- the proxy --------------------------------------------------------------------------------

class _Client:
    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.negotiated = False

    def send(self, obj: dict) -> bool:
        if self.writer.is_closing():
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_CLIENT_BACKLOG:
            self.writer.close()   # a client that never reads is dropped
            return False
        self.writer.write(json.dumps(obj).encode() + b"\r\n")
        return True


class QmpProxy:
    """A QMP server on ``listen_path`` that filters what reaches ``upstream``.

    ``upstream`` is the path of a QMP socket of the domain's QEMU (the
    machine's ``qmp-host`` monitor).  ``on_stop``/``on_cont``, when given, are
    called (in a worker thread) for ``stop`` and ``cont`` instead of forwarding
    them; they raise :class:`KdError` to refuse.
    """

    def __init__(self, listen_path: str, upstream: str, *, debug: bool, domain: str,
                 audit: AuditLog, on_stop: Callable[[], object] | None = None,
                 on_cont: Callable[[], object] | None = None):
        self.listen_path = str(listen_path)
        self.upstream_path = str(upstream)
        self.debug = debug
        self.domain = domain
        self.audit = audit
        self.on_stop = on_stop
        self.on_cont = on_cont
        self.policy = QmpPolicy(debug, domain)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._shutdown: asyncio.Event | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task] = set()
        self._upstream: _Upstream | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    connect_timeout = 10.0

    def start(self, timeout: float = 30.0) -> None:
        """Connect to QEMU and start listening; returns once clients can connect."""
        if self._thread is not None:
            raise QmpProxyError(f"the QMP proxy of key domain {self.domain} is already running")
        self._thread = threading.Thread(target=self._run, name=f"qmp-proxy-{self.domain}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise QmpProxyError(f"the QMP proxy of key domain {self.domain} did not start in time")
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error

    def close(self) -> None:
        """Disconnect every client and QEMU, remove the socket, stop the thread."""
        loop, shutdown = self._loop, self._shutdown
        if loop is not None and shutdown is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(shutdown.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "QmpProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._shutdown = asyncio.Event()
        not_running = f"key domain {self.domain} is not running (its QEMU has stopped)"
        self._upstream = _Upstream(self.upstream_path, self._on_event, not_running,
                                   f"kd-qmp-proxy-{self.domain}")
        server = None
        try:
            try:
                await asyncio.wait_for(self._upstream.connect(), self.connect_timeout)
            except asyncio.TimeoutError:
                raise QmpProxyError(
                    f"QEMU's monitor {self.upstream_path} did not greet the QMP proxy of key "
                    f"domain {self.domain}", "a QMP socket serves one client at a time; is "
                    "another client connected to it?") from None
            except (QMPError, OSError) as exc:
                cause = getattr(exc, "exc", None) or exc    # ConnectError wraps the cause
                raise QmpProxyError(
                    f"cannot connect the QMP proxy of key domain {self.domain} to QEMU's "
                    f"monitor {self.upstream_path}: {cause}", "check that the domain is running") \
                    from None
            claim_socket_path(self.listen_path)
            try:
                server = await asyncio.start_unix_server(self._serve, self.listen_path,
                                                         limit=MAX_MESSAGE)
                os.chmod(self.listen_path, 0o600)
            except OSError as exc:
                raise QmpProxyError(f"cannot listen on {self.listen_path}: {exc.strerror}",
                                    "check that the directory exists and is writable") from None
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            log.warning("QMP endpoint of %s did not start: %s", self.domain, exc)
            self._start_error = exc
            await self._upstream.close()
            self._ready.set()
            return
        log.info("QMP endpoint of %s listening on %s (%s)", self.domain, self.listen_path,
                 "DEBUG" if self.debug else "no DEBUG policy")
        self._ready.set()
        await self._shutdown.wait()
        server.close()
        for client in list(self._clients):
            client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._upstream.close()
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass

    # -- events -------------------------------------------------------------------------------
    def _on_event(self, event: dict) -> None:
        shown = self.policy.filter_event(event)
        if shown is None:
            return
        for client in list(self._clients):
            if client.negotiated:
                client.send(shown)

    # -- one client ---------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        splitter = QmpInputSplitter()
        try:
            client.send({"QMP": {"version": self._upstream.version, "capabilities": []}})
            while not writer.is_closing():
                data = await reader.read(65536)
                if not data:
                    break
                for item in splitter.feed(data):
                    if isinstance(item, InputError):
                        client.send(error_reply(item.desc))
                        if item.fatal:
                            log.warning("QMP endpoint of %s: closing a client: %s",
                                        self.domain, item.desc)
                            await self._hang_up(reader, writer)
                            return
                        continue
                    reply = await self._handle(client, item)
                    client.send(reply)
                if writer.is_closing():
                    break
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass   # the client went away; nothing to clean up in QEMU
        except asyncio.CancelledError:
            pass   # the proxy is closing
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close a client after a fatal error so that it still reads the error: half-close,
        then discard what it is still sending (bounded), so the close is not a reset."""
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        discarded = 0
        while discarded < DISCARD_LIMIT:
            try:
                data = await asyncio.wait_for(reader.read(65536), DISCARD_WAIT)
            except asyncio.TimeoutError:
                break
            if not data:
                break
            discarded += len(data)

    async def _handle(self, client: _Client, msg) -> dict:
        """The reply to one parsed message (QEMU's dispatcher checks, then the policy)."""
        if not isinstance(msg, dict):
            return error_reply("QMP input must be a JSON object")
        has_id = "id" in msg
        reply = await self._dispatch(client, msg)
        if has_id:
            reply = {"id": msg["id"], **reply}
        return reply

    async def _dispatch(self, client: _Client, msg: dict) -> dict:
        for key, value in msg.items():
            if key == "execute":
                if not isinstance(value, str):
                    return error_reply("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return error_reply("QMP input member 'arguments' must be an object")
            elif key != "id":
                return error_reply(f"QMP input member '{key[:40]}' is unexpected")
        if "execute" not in msg:
            return error_reply("QMP input lacks member 'execute'")
        command = msg["execute"]
        arguments = msg.get("arguments") or {}
        if not client.negotiated:
            if command != "qmp_capabilities":
                return error_reply("Expecting capabilities negotiation with 'qmp_capabilities'",
                                   "CommandNotFound")
            enable = arguments.get("enable", [])
            if not isinstance(enable, list) or set(arguments) - {"enable"}:
                return error_reply("Invalid parameter for 'qmp_capabilities'")
            if enable:
                return error_reply(f"Capability '{str(enable[0])[:40]}' not available")
            client.negotiated = True
            return {"return": {}}
        if command == "qmp_capabilities":
            return error_reply("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
        verdict = self.policy.judge(command, arguments)
        if verdict.audited:
            try:
                self.audit.record(domain=self.domain, endpoint="qmp",
                                  action=summarize(command, arguments), allowed=verdict.allowed,
                                  debug=self.debug)
            except AuditError as exc:   # fail closed: nothing unaudited gets through
                log.error("QMP endpoint of %s: %s refused: %s", self.domain, command[:80], exc)
                return error_reply(f"'{command[:80]}' is refused: {exc.message}")
        if not verdict.allowed:
            return error_reply(verdict.reason)
        callback = {"stop": self.on_stop, "cont": self.on_cont}.get(verdict.run_control)
        if callback is not None:
            reply = await self._callback(callback, verdict.run_control)
            # HMP returns its (empty) output text where QMP returns an empty object.
            return {"return": ""} if "return" in reply and command != verdict.run_control else reply
        reply = await self._upstream.execute(command, arguments)
        if "return" in reply:
            return {"return": self.policy.filter_result(command, reply["return"])}
        err = reply.get("error")
        if isinstance(err, dict):
            return {"error": {"class": str(err.get("class", "GenericError")),
                              "desc": str(err.get("desc", ""))}}
        return error_reply(f"QEMU gave a malformed reply to '{command}'")

    async def _callback(self, func: Callable[[], object], command: str) -> dict:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, func)
        except KdError as exc:
            return error_reply(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client, the proxy goes on
            log.error("QMP endpoint of %s: %s failed: %s", self.domain, command,
                      type(exc).__name__)
            return error_reply(f"'{command}' failed for key domain {self.domain}: {exc}")
        return {"return": {}}
