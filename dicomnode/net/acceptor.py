"""The lean acceptor's server: accept loop + one thread per association (see ``net/ul.py``).

``AcceptorServer(...).start()`` binds (raises OSError), ``stop()`` closes the listening socket and
every open connection. All decisions (who may associate, how to store) are callbacks from the SCP.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
from typing import Callable

from dicomnode.net.ul import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    MAX_CONTROL_PDU,
    NO_DATASET,
    RELEASE_RP,
    Association,
    ProtocolError,
    StoreHandler,
    _uid,
    _us,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
    encode_pdata_command,
    encode_response,
    parse_associate_rq,
    parse_command,
)

LOG = logging.getLogger("dicomnode.ul")
VERIFICATION = "1.2.840.10008.1.1"
ARTIM_S = 10.0  # a connection must send its A-ASSOCIATE-RQ within this (or the network timeout)


class AcceptorServer:
    """Listens on ``address`` and serves associations until :meth:`stop`."""

    def __init__(self, *, address: tuple[str, int], max_pdu: int, max_associations: int, timeout_s: float,
                 contexts: dict[str, frozenset[str]], ts_preference: tuple[str, ...],
                 permits: Callable[[str, str], bool], store: StoreHandler,
                 on_release: Callable[[Association], None],
                 prepare_socket: Callable[[socket.socket], socket.socket | None],
                 impl_uid: str, impl_version: str, max_dataset_bytes: int = 2 * 1024**3) -> None:
        self.address = address
        self.max_dataset_bytes = max_dataset_bytes
        self.max_pdu = max_pdu if max_pdu > 0 else 0xFFFFFFFF
        self.max_associations = max_associations
        self.timeout_s = timeout_s
        self.contexts = contexts  # abstract syntax -> accepted transfer syntaxes
        self.ts_preference = ts_preference
        self.permits = permits
        self.store = store
        self.on_release = on_release
        self.prepare_socket = prepare_socket
        self.impl_uid, self.impl_version = impl_uid, impl_version
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._active = 0
        self._pending = 0
        self.max_pending = 4 * max_associations + 16
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        """Bind and accept in a daemon thread; raises OSError when the address is unusable."""
        s = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.address)
        s.listen(64)
        s.settimeout(0.5)
        self._sock = s
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="dicomnode-ul-accept", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; give open associations ``grace_s`` to finish, then cut them."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            with self._lock:
                if self._active == 0:
                    break
            time.sleep(0.05)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn, str(addr[0])), name="dicomnode-assoc",
                             daemon=True).start()

    # ---- one connection --------------------------------------------------------------------
    def _serve(self, raw: socket.socket, host: str) -> None:
        # A connection is "pending" until its A-ASSOCIATE-RQ is in; only accepted associations count
        # against max_associations, so idle connections cannot lock known peers out. Pending ones
        # are bounded separately (max_pending) and must send their request within ARTIM_S.
        state = {"pending": True, "active": False}
        sock: socket.socket | None = raw
        with self._lock:
            self._pending += 1
            too_many = self._pending > self.max_pending
        try:
            if too_many:
                LOG.warning("connection dropped: %d connections have not associated yet", self.max_pending)
                return
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(min(self.timeout_s, ARTIM_S))  # until the A-ASSOCIATE-RQ is in
            sock = self.prepare_socket(raw)
            if sock is None:
                return
            with self._lock:
                self._conns.add(sock)
            self._associate_and_run(sock, host, state)
        except (OSError, ProtocolError) as exc:
            LOG.info("association ended: %s", exc.__class__.__name__)
            if isinstance(exc, (ProtocolError, TimeoutError)) and sock is not None:
                try:
                    sock.sendall(encode_abort(2, 0))
                except OSError:
                    pass
        except Exception:  # never let one connection take the server down
            LOG.exception("association failed")
            if sock is not None:
                try:
                    sock.sendall(encode_abort(2, 0))
                except OSError:
                    pass
        finally:
            with self._lock:
                if state["pending"]:
                    self._pending -= 1
                if state["active"]:
                    self._active -= 1
                if sock is not None:
                    self._conns.discard(sock)
            for s in {raw, sock}:
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _read_pdu(self, sock: socket.socket, limit_pdata: int) -> tuple[int, bytearray]:
        head = _recv_exact(sock, 6)
        pdu_type, _, length = struct.unpack(">BBL", head)
        if length > (limit_pdata if pdu_type == 0x04 else MAX_CONTROL_PDU):
            LOG.warning("PDU of %d bytes (type 0x%02X) over the limit: connection closed", length, pdu_type)
            raise ProtocolError("PDU too large")
        return pdu_type, _recv_exact(sock, length)

    def _associate_and_run(self, sock: socket.socket, host: str, state: dict[str, bool]) -> None:
        pdu_type, body = self._read_pdu(sock, 0)
        with self._lock:
            self._pending -= 1
            state["pending"] = False
        if pdu_type != 0x01:
            raise ProtocolError("expected A-ASSOCIATE-RQ")
        rq = parse_associate_rq(bytes(body))
        if not rq.protocol_ok:
            sock.sendall(encode_associate_rj(1, 2, 2))
            return
        if not self.permits(rq.calling_ae, host):
            LOG.warning("association refused: caller not allowed (host %s)", host)
            sock.sendall(encode_associate_rj(1, 1, 3))
            return
        with self._lock:
            over_limit = self._active >= self.max_associations
            if not over_limit:
                self._active += 1
                state["active"] = True
        if over_limit:
            LOG.warning("association refused: %d associations already open", self.max_associations)
            sock.sendall(encode_associate_rj(2, 3, 2))
            return
        sock.settimeout(self.timeout_s)
        assoc = Association(uuid.uuid4().hex, rq.calling_ae, host)
        results = []
        for ctx_id, abstract, tss in rq.contexts:
            accepted = self.contexts.get(abstract)
            if accepted is None:
                results.append((ctx_id, 3, tss[0] if tss else "1.2.840.10008.1.2"))
                continue
            chosen = next((ts for ts in tss if ts in accepted), None)
            if chosen is None:
                results.append((ctx_id, 4, tss[0] if tss else "1.2.840.10008.1.2"))
                continue
            assoc.contexts[ctx_id] = (abstract, chosen)
            results.append((ctx_id, 0, chosen))
        sock.sendall(encode_associate_ac(rq, results, self.max_pdu if self.max_pdu < 0xFFFFFFFF else 0,
                                         self.impl_uid, self.impl_version))
        self._data_phase(sock, assoc)

    def _data_phase(self, sock: socket.socket, assoc: Association) -> None:
        cmd = bytearray()
        command: dict[int, bytes] | None = None
        chunks: list[memoryview] = []
        received = 0
        ctx = 0
        while True:
            pdu_type, body = self._read_pdu(sock, self.max_pdu)
            if pdu_type == 0x05:  # A-RELEASE-RQ
                sock.sendall(RELEASE_RP)
                self.on_release(assoc)
                return
            if pdu_type == 0x07:  # A-ABORT
                LOG.info("association aborted by the peer")
                return
            if pdu_type != 0x04:
                raise ProtocolError("unexpected PDU")
            view = memoryview(body)
            off = 0
            while off + 6 <= len(body):
                item_len, pctx, hdr = struct.unpack_from(">LBB", body, off)
                if item_len < 2 or off + 4 + item_len > len(body):
                    raise ProtocolError("malformed PDV")
                if pctx not in assoc.contexts:
                    raise ProtocolError("PDV on a context that was not accepted")
                data = view[off + 6: off + 4 + item_len]
                off += 4 + item_len
                if hdr & 0x01:  # command fragment
                    if command is not None:
                        raise ProtocolError("command while a data set was expected")
                    cmd += data
                    if hdr & 0x02:
                        command, ctx = parse_command(cmd), pctx
                        cmd = bytearray()
                        if _us(command.get(0x0800)) == NO_DATASET:
                            self._dispatch(sock, assoc, ctx, command, [])
                            command = None
                else:  # data set fragment
                    if command is None or pctx != ctx:
                        raise ProtocolError("data set without its command")
                    chunks.append(data)
                    received += len(data)
                    if received > self.max_dataset_bytes:
                        LOG.warning("data set over %d bytes: association aborted", self.max_dataset_bytes)
                        raise ProtocolError("data set too large")
                    if hdr & 0x02:
                        self._dispatch(sock, assoc, ctx, command, chunks)
                        command, chunks, received = None, [], 0

    def _dispatch(self, sock: socket.socket, assoc: Association, ctx: int, command: dict[int, bytes],
                  chunks: list[memoryview]) -> None:
        field_ = _us(command.get(0x0100))
        msg_id = _us(command.get(0x0110)) or 0
        abstract, ts = assoc.contexts[ctx]
        if field_ == C_ECHO_RQ:
            rsp = encode_response(C_ECHO_RSP, msg_id, VERIFICATION, 0x0000)
        elif field_ == C_STORE_RQ and chunks:
            sop_class = _uid(command.get(0x0002, b"")) or abstract
            sop_uid = _uid(command.get(0x1000, b""))
            if sop_class != abstract:
                status, comment = 0x0122, "SOP class differs from the presentation context"
            else:
                status, comment = self.store(sop_class, sop_uid, ts, assoc, chunks)
            rsp = encode_response(C_STORE_RSP, msg_id, sop_class, status, sop_uid, comment)
        else:
            raise ProtocolError("unsupported DIMSE command")
        sock.sendall(encode_pdata_command(ctx, rsp))


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("connection closed by the peer")
        got += k
    del view
    return buf
