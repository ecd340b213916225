"""The guest agent: serves requests from the host on the shared channel.

Started by the guest's init as ``python3 -m guest_agent``.  It opens the
shared channel once and keeps it open (a closed port drops input), sends a
``ready`` event, then answers one request per line.  A malformed line gets an
error reply; nothing a host sends stops the agent except ``poweroff``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import subprocess
import sys
import termios
import threading
import time
import tty

from . import __version__, hypercall, session, window
from .protocol import (MAX_LINE, MAX_OUTPUT, ProtocolError, decode, encode, error, event, reply,
                       request)
from . import jobs

SHARED_PORT = "/dev/ttyS1"
GUEST_PORT = "/dev/ttyS2"
GUEST_PORT_TIMEOUT = 20.0
POLICY_DEBUG = 1 << 0          # policy flag bit 0: DEBUG (see the policy format)

#: What a protected guest serves to the host on the shared channel.
HOST_COMMANDS = frozenset({"ping", "attest", "session", "poweroff", "control"})
#: Served to the host as well when no platform protects the guest (a plain run).
UNPROTECTED_COMMANDS = frozenset({"exec", "exec_start", "exec_poll", "exec_kill", "window", "put_file", "get_file"})


def open_port(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    if os.isatty(fd):
        tty.setraw(fd, termios.TCSANOW)
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


class LineChannel:
    """Newline-delimited messages over a file descriptor."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = bytearray()

    def send(self, message: dict) -> None:
        data = encode(message)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def receive(self, timeout: float) -> dict:
        """The next complete message, waiting at most ``timeout`` seconds."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip(b"\r")
                del self._buf[:nl + 1]
                if line:
                    return decode(line)
                continue
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise TimeoutError("no answer")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("port closed")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                self._buf.clear()
                raise ProtocolError("overlong line")

    def lines(self):
        """Yield raw lines; an overlong line is yielded as ``None`` once, then skipped."""
        skipping = False
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self._buf += chunk
            while True:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    if len(self._buf) > MAX_LINE:
                        self._buf.clear()
                        if not skipping:
                            skipping = True
                            yield None
                    break
                line = bytes(self._buf[:nl]).strip(b"\r")
                del self._buf[:nl + 1]
                if skipping:
                    skipping = False
                    continue
                if line:
                    yield line


def _encode_output(data: bytes, encoding: str) -> str:
    if encoding == "base64":
        return base64.b64encode(data).decode()
    return data.decode("utf-8", errors="replace")


class Agent:
    """Request handlers, keyed by command name (``do_<cmd>``).

    What the host may ask depends on what the platform says this guest is
    (never on anything the host or the command line says):

    * protected (a key domain): only :data:`HOST_COMMANDS`; everything the
      tenant does travels inside the tenant session (``session`` frames);
    * unprotected (no platform, a plain QEMU run): the host is the owner, so
      ``exec`` is served on the shared channel too.
    """

    def __init__(self, channel: LineChannel, guest_port: LineChannel | None = None):
        self.channel = channel
        self.guest_port = guest_port
        self.running = True
        self.refused = 0
        self.identity: dict = {}
        self.protected = True       # until the platform says otherwise: fail closed
        self.debug = False
        self._port_ids = itertools.count(1)
        # One request at a time on the guest port: the tenant session and local
        # programs (the hypercall socket) both use it.
        self._port_lock = threading.Lock()
        self._crypto = None             # the session's crypto backend, chosen at the first attest
        self._handshake = None
        self._session = None
        self._auth_key: bytes | None = None
        self._controls = None           # guest_agent.controls.Controls, made on first use
        # Background commands (guest_agent.jobs): the tenant's, and the host's when unprotected.
        self._tenant_jobs = jobs.JobTable()
        self._host_jobs = jobs.JobTable()
        self._plain_windows = window.PlainWindows()

    # -- the platform (guest port) ---------------------------------------------------
    def platform_call(self, cmd: str, answer_within: float | None = None, **args) -> dict:
        """One request to the platform on the guest port (stands for a processor instruction)."""
        if self.guest_port is None:
            raise RuntimeError("this guest has no guest port")
        with self._port_lock:
            req_id = next(self._port_ids)
            self.guest_port.send(request(req_id, cmd, **args))
            while True:
                try:
                    msg = self.guest_port.receive(GUEST_PORT_TIMEOUT if answer_within is None
                                                  else answer_within)
                except TimeoutError:
                    raise RuntimeError("no platform answered on the guest port") from None
                if msg.get("id") != req_id:
                    continue
                if not msg.get("ok"):
                    raise RuntimeError(f"platform refused {cmd}: {msg.get('error')}")
                return msg.get("result", {})

    def hypercall(self, msg: dict) -> dict:
        """A hypercall through the platform (``leaf``, ``regs``, ``expose``, ``timeout``)."""
        checked = hypercall.request(msg.get("leaf"), msg.get("regs") or {}, msg.get("expose"),
                                    msg.get("timeout", hypercall.DEFAULT_TIMEOUT))
        # The guest's clock stands still while the platform waits for the host.
        return self.platform_call("hypercall", answer_within=checked["timeout"] + GUEST_PORT_TIMEOUT,
                                  **{k: v for k, v in checked.items() if k != "op" and v is not None})

    def learn_identity(self) -> None:
        """Ask the platform what this guest is: protected or not, and its measured policy."""
        try:
            info = self.platform_call("info")
        except (RuntimeError, OSError, ProtocolError) as exc:
            self.identity = {"protected": True, "debug": False, "error": str(exc)}
            return
        self.protected = info.get("protected") is not False
        flags = info.get("policy_flags", 0)
        self.debug = self.protected and isinstance(flags, int) and bool(flags & POLICY_DEBUG)
        self.identity = {"protected": self.protected, "debug": self.debug,
                         "keyid": info.get("keyid"), "measurement": info.get("measurement")}

    def auth_key(self) -> bytes:
        if self._auth_key is None:
            key = bytes.fromhex(self.platform_call("tenant-key")["key"])
            if len(key) != session.AUTH_KEY_SIZE:
                raise RuntimeError("the platform's tenant authority key has the wrong size")
            self._auth_key = key
        return self._auth_key

    # -- host-facing commands ------------------------------------------------------
    def ready_event(self) -> dict:
        # os.uname() and sys.version give what the platform module would, without its import.
        return event("ready", version=__version__, kernel=os.uname().release,
                     python=sys.version.split()[0], protected=self.protected, debug=self.debug,
                     uptime_s=guest_uptime())

    def do_ping(self, req: dict) -> dict:
        return {"pong": True, "refused": self.refused}

    def session_crypto(self) -> "session.SessionCrypto":
        """The guest's libcrypto through ctypes, or ``cryptography`` when that cannot load."""
        if self._crypto is None:
            self._crypto = session.guest_crypto(lambda msg: print(f"qemu-kd-guest: {msg}", file=sys.stderr))
        return self._crypto

    def do_attest(self, req: dict) -> dict:
        """A report binding the caller's nonce to a fresh session key this agent generated."""
        nonce = _hex_arg(req, "nonce", 16, 64)
        handshake = session.GuestHandshake(nonce, self.session_crypto())
        try:
            result = self.platform_call("report", report_data=handshake.report_data.hex())
        except BaseException:
            handshake.close()
            raise
        if self._handshake is not None:
            self._handshake.close()         # an older attestation's key: no OPEN may use it now
        self._handshake = handshake
        return {**result, "public_key": handshake.public_key.hex(),
                "report_data": handshake.report_data.hex(), "session_id": handshake.session_id.hex()}

    def do_session(self, req: dict) -> dict:
        """One opaque tenant-session frame in, one frame out."""
        if "window" in req:     # the frame waits in a buffer shared with the host
            data = window.read(self._shared_buffers(), req["window"])
        else:
            frame = req.get("frame")
            try:
                data = base64.b64decode(frame, validate=True) if isinstance(frame, str) else None
            except ValueError:
                data = None
            if data is None:
                raise ValueError("session needs 'frame' (base64) or 'window'")
        parsed = session.Frame.unpack(data)
        if parsed.type == session.OPEN:
            if self._handshake is None:
                raise session.SessionError("no attestation is waiting for a session; attest first")
            channel, reply_frame = self._handshake.accept(data, self.auth_key())
            self._handshake.close()         # one OPEN per attestation
            self._handshake = None
            if self._session is not None:
                self._session.close()
            self._session = channel
            return {"frame": base64.b64encode(reply_frame).decode()}
        if self._session is None:
            raise session.SessionError("no session is open")
        plain = self._session.open(data)
        sealed = self._session.seal(self.session_request(plain))
        placed = window.answer(self._shared_buffers(), req.get("reply_window"), sealed)
        if placed is not None:
            return {"window": placed}
        return {"frame": base64.b64encode(sealed).decode()}

    def _host_owns_guest(self, cmd: str) -> None:
        if self.protected:
            raise PermissionError(f"{cmd} is not served to the host on a protected guest; "
                                  "the tenant runs commands through its session")

    def do_exec(self, req: dict) -> dict:
        self._host_owns_guest("exec")
        return run_command(req)

    def do_exec_start(self, req: dict) -> dict:
        self._host_owns_guest("exec_start")
        return start_job(self._host_jobs, req, tenant=False)

    def do_exec_poll(self, req: dict) -> dict:
        self._host_owns_guest("exec_poll")
        return poll_job(self._host_jobs, req)

    def do_exec_kill(self, req: dict) -> dict:
        self._host_owns_guest("exec_kill")
        return self._host_jobs.kill(req.get("job"))

    def do_poweroff(self, req: dict) -> dict:
        self.running = False
        return {"poweroff": True}

    def do_control(self, req: dict) -> dict:
        """A host request to change this guest's VMCS or EPT: the guest's verdict (controls.py)."""
        if not self.protected:
            raise PermissionError("control requests need a platform: this guest is not protected")
        if self._controls is None:
            from .controls import Controls

            self._controls = Controls(self.platform_call)
        return self._controls.handle(req)

    # -- tenant session requests ---------------------------------------------------
    def session_request(self, plain: bytes) -> bytes:
        try:
            msg = json.loads(plain.decode("utf-8"))
            op = msg.get("op") if isinstance(msg, dict) else None
            handler = getattr(self, f"tenant_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise ValueError(f"unknown session operation {op!r}")
            answer = {"ok": True, "result": handler(msg)}
        except Exception as exc:  # noqa: BLE001 - every failure is an answer inside the session
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return json.dumps(answer, separators=(",", ":")).encode()

    def tenant_exec(self, msg: dict) -> dict:
        return run_command(msg, tenant=True)

    def tenant_exec_start(self, msg: dict) -> dict:
        return start_job(self._tenant_jobs, msg, tenant=True)

    def tenant_exec_poll(self, msg: dict) -> dict:
        return poll_job(self._tenant_jobs, msg)

    def tenant_exec_kill(self, msg: dict) -> dict:
        return self._tenant_jobs.kill(msg.get("job"))

    def tenant_put_file(self, msg: dict) -> dict:
        # Inline only: the whole session frame may have crossed a shared buffer, but its
        # contents are the tenant's, never bytes the host left in one.
        return self._put_file(msg, base64.b64decode(_str_arg(msg, "data"), validate=True))

    def tenant_get_file(self, msg: dict) -> dict:
        data, result = _read_file(msg)
        return {"data": base64.b64encode(data).decode(), **result}

    # -- bulk data (guest_agent.window) ----------------------------------------------
    def _shared_buffers(self) -> list:
        """The buffers this guest shares with its host (installed ``share`` controls, or ``window``)."""
        if not self.protected:
            return self._plain_windows.regions
        return self._controls.shared if self._controls is not None else []

    def _payload(self, msg: dict) -> bytes:
        """A host request's bytes (unprotected guests): inline (``data``, base64) or in a
        shared buffer (``window``)."""
        if "window" in msg:
            return window.read(self._shared_buffers(), msg["window"])
        return base64.b64decode(_str_arg(msg, "data"), validate=True)

    @staticmethod
    def _put_file(msg: dict, data: bytes) -> dict:
        from .secrets import write_file

        path = _str_arg(msg, "path")
        mode = msg.get("mode", 0o644)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if msg.get("append") else os.O_TRUNC)
        mode = mode if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o7777 else 0o644
        write_file(path, data, flags, mode)
        if not msg.get("append"):
            os.chmod(path, mode)        # the mode asked for, whatever the umask or an older file had
        return {"written": len(data), "path": path}

    def do_window(self, req: dict) -> dict:
        """(Unprotected guests only) lock a buffer of ``pages`` pages and share it with the host."""
        return self._plain_windows.open(req)

    def do_put_file(self, req: dict) -> dict:
        """(Unprotected guests only) write a file from inline data or a shared buffer."""
        return self._put_file(req, self._payload(req))

    def do_get_file(self, req: dict) -> dict:
        """(Unprotected guests only) read part of a file, into the ``reply_window`` if there is one."""
        data, result = _read_file(req)
        placed = window.answer(self._shared_buffers(), req.get("reply_window"), data)
        if placed is not None:
            return {"window": placed, **result}
        return {"data": base64.b64encode(data).decode(), **result}

    def tenant_put_secret(self, msg: dict) -> dict:
        from .secrets import write_secret

        path = _str_arg(msg, "path")
        secret = base64.b64decode(_str_arg(msg, "secret"), validate=True)
        write_secret(path, secret)
        return {"written": len(secret), "path": path}

    def tenant_derive_key(self, msg: dict) -> dict:
        label = msg.get("label", "")
        if not isinstance(label, str) or len(label) > 256:
            raise ValueError("derive_key needs a 'label' string of at most 256 characters")
        return self.platform_call("derive-key", label=label)

    def tenant_report(self, msg: dict) -> dict:
        data = bytes.fromhex(_str_arg(msg, "report_data"))
        if len(data) != 64:
            raise ValueError("report needs 'report_data': 64 bytes as 128 hex digits")
        return self.platform_call("report", report_data=data.hex())

    def tenant_hypercall(self, msg: dict) -> dict:
        return self.hypercall(msg)

    # -- guest programs (the local socket; guest_agent.attest_api) ------------------
    def local_report(self, msg: dict) -> dict:
        """A report over the program's 64-byte report_data, with the platform's certificate chain."""
        result = self.tenant_report(msg)
        chain = self.platform_call("certificates").get("chain_pem")
        if not isinstance(chain, str):
            raise RuntimeError("the platform gave no certificate chain")
        return {**result, "chain_pem": chain}

    def local_ops(self) -> dict:
        """What the local socket serves to programs in the guest, by ``op``."""
        return {"hypercall": self.hypercall, "report": self.local_report, "derive-key": self.tenant_derive_key}

    def tenant_ping(self, msg: dict) -> dict:
        crypto = self._crypto.name if self._crypto is not None else None
        return {"pong": True, **self.identity, "session_crypto": crypto}

    # -- dispatch ------------------------------------------------------------------
    def handle(self, line: bytes | None) -> None:
        if line is None:
            self.channel.send(error(None, f"line exceeds the {MAX_LINE}-byte limit"))
            return
        try:
            req = decode(line)
        except ProtocolError as exc:
            self.refused += 1
            self.channel.send(error(None, f"malformed request: {exc}"))
            return
        req_id = req.get("id")
        cmd = req.get("cmd")
        allowed = HOST_COMMANDS if self.protected else HOST_COMMANDS | UNPROTECTED_COMMANDS
        if not isinstance(cmd, str) or cmd not in allowed:
            self.refused += 1
            why = "is not served to the host" if self.protected and cmd in UNPROTECTED_COMMANDS else "is unknown"
            self.channel.send(error(req_id, f"command {cmd!r} {why}; this guest serves the host only "
                                            f"{', '.join(sorted(allowed))}"))
            return
        try:
            result = getattr(self, f"do_{cmd}")(req)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            self.refused += 1
            self.channel.send(error(req_id, f"{cmd}: {exc}"))
            return
        self.channel.send(reply(req_id, result))

    def serve(self) -> None:
        self.channel.send(self.ready_event())
        for line in self.channel.lines():
            self.handle(line)
            if not self.running:
                break


def run_command(req: dict, tenant: bool = False) -> dict:
    """Run ``argv`` (or ``shell`` through /bin/sh) with optional stdin, env and timeout, to its end.

    The tenant's stdin is base64 and its commands have no default timeout; the
    host's (unprotected guests) stdin is text and its commands time out after 60 s.
    """
    spec = jobs.CommandSpec.from_request(req, stdin_base64=tenant, default_timeout=None if tenant else 60)
    encoding = req.get("encoding", "base64" if tenant else "text")
    if encoding not in ("text", "base64"):
        raise ValueError("exec 'encoding' must be 'text' or 'base64'")
    done = jobs.run(spec)
    return {"rc": done.rc, "stdout": _encode_output(done.stdout, encoding),
            "stderr": _encode_output(done.stderr, encoding), "timed_out": done.timed_out,
            "truncated": done.truncated}


def start_job(table: "jobs.JobTable", req: dict, tenant: bool) -> dict:
    """``exec_start``: the command of ``exec`` as a background job (stdin always base64)."""
    spec = jobs.CommandSpec.from_request(req, stdin_base64=True, default_timeout=None if tenant else 60)
    return {"job": table.start(spec)}


def poll_job(table: "jobs.JobTable", req: dict) -> dict:
    """``exec_poll``: the job's output since the last poll, waiting up to ``max_wait`` seconds."""
    wait = req.get("max_wait", jobs.MAX_POLL_WAIT)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise ValueError("exec_poll 'max_wait' must be a number of seconds >= 0")
    return table.poll(req.get("job"), float(wait))


def _read_file(msg: dict) -> tuple[bytes, dict]:
    """``get_file``: the bytes asked for, and the reply's ``size`` and ``offset``."""
    path = _str_arg(msg, "path")
    offset = msg.get("offset", 0)
    length = msg.get("length", MAX_OUTPUT)
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or not 0 < length <= MAX_OUTPUT:
        raise ValueError(f"get_file needs 0 <= offset and 0 < length <= {MAX_OUTPUT}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read(length)
    return data, {"size": size, "offset": offset}


def _str_arg(req: dict, name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string")
    return value


def _hex_arg(req: dict, name: str, min_len: int, max_len: int) -> bytes:
    value = req.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or not min_len <= len(raw) <= max_len:
        raise ValueError(f"'{name}' must be {min_len}..{max_len} bytes as hex")
    return raw


def power_off() -> None:
    """Leave the guest: without ACPI, ``poweroff`` only halts, so reboot (QEMU runs -no-reboot)."""
    os.sync()
    try:
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("b")
    except OSError:
        os.system("reboot -f")


def guest_uptime() -> float | None:
    """Seconds since the guest kernel started, as the guest's own clock counts them."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def console_policy(allow_shell: bool) -> None:
    """The console (ttyS0) is host-controlled: a root shell only when the policy allows it.

    Otherwise nothing reads it: input is not echoed, raises no signals and
    reaches no program, and the keyboard's SysRq is off.  Kernel and agent
    output still go out.
    """
    if allow_shell:
        threading.Thread(target=_console_shells, name="console", daemon=True).start()
        return
    try:
        with open("/proc/sys/kernel/sysrq", "w") as f:
            f.write("0")
    except OSError:
        pass
    try:
        fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return
    try:
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIFLUSH)
    except termios.error:
        pass
    finally:
        os.close(fd)


def serve_local_api(agent: Agent, path: str = hypercall.AGENT_SOCKET) -> threading.Thread | None:
    """Serve guest programs (``kd-hypercall``, ``kd-report``, ``kd-derive-key``) on a local socket.

    Root only (the directory is 0700); one JSON request line per connection,
    one answer line.  Served: :meth:`Agent.local_ops` (``hypercall``,
    ``report``, ``derive-key``; client in :mod:`guest_agent.local_api`).
    """
    import socket

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(8)
    except OSError as exc:
        print(f"qemu-kd-guest: no local agent socket: {exc}", file=sys.stderr)
        return None

    def answer(conn) -> None:
        with conn:
            try:
                conn.settimeout(10)
                data = bytearray()
                while b"\n" not in data and len(data) <= MAX_LINE:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                msg = json.loads(bytes(data).split(b"\n", 1)[0])
                ops = agent.local_ops()
                handler = ops.get(msg.get("op")) if isinstance(msg, dict) else None
                if handler is None:
                    raise ValueError(f"the local agent socket serves only {', '.join(sorted(ops))}")
                out = {"ok": True, "result": handler(msg)}
            except Exception as exc:  # noqa: BLE001 - every failure is an answer
                out = {"ok": False, "error": str(exc)}
            try:
                conn.settimeout(None)
                conn.sendall(json.dumps(out).encode() + b"\n")
            except OSError:
                pass

    def loop() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, name="local-api", daemon=True)
    thread.start()
    return thread


def _console_shells() -> None:
    while True:
        subprocess.run(["setsid", "cttyhack", "sh"], check=False)
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    port = argv[0] if argv else SHARED_PORT
    gport_path = argv[1] if len(argv) > 1 else GUEST_PORT
    try:
        gport = LineChannel(open_port(gport_path))
    except OSError:
        gport = None
    agent = Agent(LineChannel(open_port(port)), gport)
    agent.learn_identity()
    if gport is not None:
        serve_local_api(agent)
    console_policy(allow_shell=agent.debug or not agent.protected)
    agent.serve()
    if not agent.running:
        power_off()
    return 0
