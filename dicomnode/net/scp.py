"""The Storage SCP: C-ECHO and C-STORE into the durable spool.

Per C-STORE: the raw encoded dataset (as received, never decoded) gets a Part-10 file meta
header; only the few header elements completion needs are read (:mod:`dicomnode.net.header`: a
scan of the raw bytes, pydicom as fallback); UIDs are validated; the file is written durably
(:mod:`dicomnode.store.spool`) and its row committed (:mod:`dicomnode.store.db`); only then is
0x0000 returned.

Two upper layers (``node.scp_engine``): ``fast`` (default, :mod:`dicomnode.net.acceptor`, one
thread per association, measured ~2x faster under CPU contention) and ``pynetdicom``. Both share
:meth:`StorageSCP.store_instance`, the allow-list, TLS, PDU and association limits (only
established associations count); only ``fast`` enforces ``node.max_instance_bytes``.

Outcomes (exceptions become statuses here, and only here):
0xA700 out of resources (quota, disk full, database error) - nothing stored;
0xA900 dataset does not match (SOP class/instance differ from the command, type 1 UIDs missing);
0xC000 cannot understand (unparseable, invalid UIDs); 0x0122 for classes not offered.

Connections: TCP_NODELAY on every accepted socket; DICOM TLS when ``[tls] enabled`` (a plain
connection is refused when ``require``); calling-AE/host allow-list (:mod:`dicomnode.net.security`)
enforced at A-ASSOCIATE with reason (1, 1, 3).
"""
from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import time
import uuid
from io import BytesIO
from typing import Any, Callable

import pydicom
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, evt
from pynetdicom.acse import ACSE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.config import Config
from dicomnode.errors import InstanceRejected
from dicomnode.net import dimse
from dicomnode.net.acceptor import AcceptorServer
from dicomnode.net.header import (  # noqa: F401  (parse_header, file_meta_bytes: public here too)
    IMPLEMENTATION_VERSION,
    file_meta_bytes,
    header_from_chunks,
    parse_header,
)
from dicomnode.net.security import REJECT_UNKNOWN_CALLER, AllowList, looks_like_tls, server_ssl_context
from dicomnode.ops.logs import quiet_third_party, series_key
from dicomnode.store.db import Database
from dicomnode.store.records import InstanceMeta
from dicomnode.store.spool import Spool, valid_uid

LOG = logging.getLogger("dicomnode.scp")

_ACCEPTED_TS = frozenset(dimse.ACCEPTED_TRANSFER_SYNTAXES)


class _NodeACSE(ACSE):
    """ACSE that applies the node's allow-list (calling AE + host) before negotiating."""

    allow: AllowList
    max_associations: int

    def _reject(self, calling: str, rsd: tuple[int, int, int]) -> None:
        self.requestor.ae_title = calling
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "")
        host = str(getattr(self.assoc.requestor.address_info, "address", "") or "")
        if not self.allow.permits(calling, host):
            LOG.warning("association refused: caller not allowed (host %s)", host)
            self._reject(calling, REJECT_UNKNOWN_CALLER)
            return
        # Count established associations only (pynetdicom counts every connected socket, so idle
        # connections from anyone could lock known peers out).
        established = [a for a in self.assoc.ae.active_associations
                       if a.is_acceptor and a.is_established and a is not self.assoc]
        if len(established) >= self.max_associations:
            LOG.warning("association refused: %d associations already open", self.max_associations)
            self._reject(calling, (0x02, 0x03, 0x02))
            return
        # Take the requestor's first transfer syntax that the node accepts (pynetdicom would take
        # the acceptor's first): a sender with RLE/JPEG files then sends them as they are, and the
        # node stores the bytes as received instead of forcing a decompression.
        for cx in getattr(rq, "presentation_context_definition_list", []) or []:
            first = next((ts for ts in cx.transfer_syntax if str(ts) in _ACCEPTED_TS), None)
            if first is not None:
                cx.transfer_syntax = [first]
        super()._negotiate_as_acceptor()


def _fast_reactor(assoc: Any) -> None:
    """Cut pynetdicom's polling latency (measured: bare SCP 159/s -> 250/s on this machine).

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it finds nothing to do, and
    the association thread polls its message queue every 1 ms; per C-STORE both add up. The DUL
    delay goes to 0.1 ms and the association thread blocks on its queue (20 ms at most, so release
    and abort are still noticed promptly).
    """
    assoc.dul._run_loop_delay = 0.0001
    q = assoc.dimse.msg_queue

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        try:
            return q.get(timeout=0.02)
        except queue.Empty:
            return None, None

    assoc.dimse.get_msg = get_msg


MAX_CONTROL_PDU = 1 << 20  # A-ASSOCIATE-RQ and friends: far above any real one (128 contexts)


def _limit_pdus(assoc: Any, max_pdu: int) -> None:
    """Refuse PDUs longer than we negotiated (P-DATA: ``max_pdu``; others: 1 MiB).

    pynetdicom reads whatever length a peer announces; a hostile peer could make it buffer
    gigabytes. An oversized PDU header closes the connection before its body is read.
    The replacement also reads with ``recv_into`` (pynetdicom reads 4 KiB per ``recv``).
    """
    sock = assoc.dul.socket
    limit_pdata = max_pdu if max_pdu > 0 else 0xFFFFFFFF

    def guarded_recv(nr_bytes: int) -> bytearray:
        # Same contract as AssociationSocket.recv (short read = connection broken), but one
        # recv_into per kernel buffer instead of 4 KiB recv() + copy per call.
        raw = sock.socket
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = raw.recv_into(view[got:], nr_bytes - got)
            if not n:
                del view
                return buf[:got]
            got += n
        del view
        if nr_bytes == 6:
            pdu_type, _, length = struct.unpack(">BBL", buf)
            if length > (limit_pdata if pdu_type == 0x04 else MAX_CONTROL_PDU):
                LOG.warning("PDU of %d bytes (type 0x%02X) over the limit: connection closed", length, pdu_type)
                raise OSError("PDU too large")
        return buf

    sock.recv = guarded_recv


class StorageSCP:
    """The node's DICOM listener. ``start()`` binds and serves in a thread; ``stop()`` closes it.

    ``on_release(series_uids)`` is called after an association is released (for completion).
    """

    def __init__(self, cfg: Config, db: Database, spool: Spool,
                 on_release: Callable[[list[str]], None] | None = None) -> None:
        quiet_third_party()
        self.cfg = cfg
        self.db = db
        self.spool = spool
        self.on_release = on_release
        self.allow = AllowList.from_config(cfg)
        self.ssl_context: ssl.SSLContext | None = server_ssl_context(cfg)
        self.server: ThreadedAssociationServer | None = None
        self.fast: AcceptorServer | None = None
        self._thread: threading.Thread | None = None
        self.nodelay_ok: bool | None = None  # TCP_NODELAY as read back from the last accepted socket
        self.stats = {"stored": 0, "duplicates": 0, "rejected": 0, "associations": 0}
        self._stats_lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        n = self.cfg.node
        ae = AE(ae_title=n.ae_title)
        ae.maximum_pdu_size = n.max_pdu
        ae.maximum_associations = 4 * n.max_associations + 16  # connections; associations: _NodeACSE
        ae.network_timeout = n.network_timeout_s
        ae.acse_timeout = 30
        ae.dimse_timeout = n.network_timeout_s
        ae.require_calling_aet = []
        ae.implementation_version_name = IMPLEMENTATION_VERSION.decode()
        ae.add_supported_context(dimse.VERIFICATION)
        for sop in dimse.IMAGE_STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop, list(dimse.ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self.fast is not None:
            return self.fast.port
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Bind ``node.bind_address:node.port`` and serve in a daemon thread; raises OSError.

        ``node.scp_engine = "fast"`` (default) serves with the lean acceptor (``net/ul.py``);
        ``"pynetdicom"`` with pynetdicom's association machinery. Both store through
        :meth:`store_instance` with the same checks.
        """
        if self.cfg.node.scp_engine == "fast":
            self._start_fast()
        else:
            self._start_pynetdicom()
        LOG.info("storage SCP listening on %s:%d (AE %s, TLS %s, engine %s)", self.cfg.node.bind_address, self.port,
                 self.cfg.node.ae_title, "on" if self.ssl_context else "off", self.cfg.node.scp_engine)

    def _start_fast(self) -> None:
        n = self.cfg.node
        contexts = {dimse.VERIFICATION: frozenset(dimse.UNCOMPRESSED_TRANSFER_SYNTAXES)}
        contexts.update({sop: _ACCEPTED_TS for sop in dimse.IMAGE_STORAGE_SOP_CLASSES})

        def prepare(sock: socket.socket) -> socket.socket | None:
            self.nodelay_ok = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            return self._maybe_tls(sock)

        def store(sop_class: str, sop_uid: str, ts: str, assoc: Any, chunks: list[memoryview]) -> tuple[int, str]:
            return self.store_instance(sop_class, sop_uid, ts, assoc.calling_ae, assoc.id, chunks)

        def released(assoc: Any) -> None:
            self._released(assoc.id)

        self.fast = AcceptorServer(
            address=(n.bind_address, n.port), max_pdu=n.max_pdu, max_associations=n.max_associations,
            timeout_s=n.network_timeout_s, contexts=contexts, ts_preference=dimse.ACCEPTED_TRANSFER_SYNTAXES,
            permits=self.allow.permits, store=store, on_release=released, prepare_socket=prepare,
            impl_uid=str(PYNETDICOM_IMPLEMENTATION_UID), impl_version=IMPLEMENTATION_VERSION.decode(),
            max_dataset_bytes=n.max_instance_bytes)
        self.fast.start()

    def _start_pynetdicom(self) -> None:
        scp = self

        class Handler(RequestHandler):
            def handle(self) -> None:  # runs in the connection's own thread
                sock = self.request
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    scp.nodelay_ok = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    sock = scp._maybe_tls(sock)
                except OSError as exc:
                    LOG.warning("connection from %s dropped: %s", self.client_address[0], exc.__class__.__name__)
                    return
                if sock is None:
                    return
                self.request = sock
                super().handle()

            def _create_association(self) -> Any:
                assoc = super()._create_association()
                acse = _NodeACSE(assoc)
                acse.allow = scp.allow
                acse.max_associations = scp.cfg.node.max_associations
                assoc.acse = acse
                assoc.dicomnode_id = uuid.uuid4().hex  # type: ignore[attr-defined]
                _fast_reactor(assoc)
                _limit_pdus(assoc, scp.cfg.node.max_pdu)
                return assoc

        handlers = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        address = (self.cfg.node.bind_address, self.cfg.node.port)
        server = ThreadedAssociationServer(self.ae, address, self.cfg.node.ae_title, self.ae.supported_contexts,
                                           evt_handlers=handlers, request_handler=Handler)
        server.daemon_threads = True
        self.server = server
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="dicomnode-scp", daemon=True)
        self._thread.start()

    def _maybe_tls(self, sock: socket.socket) -> socket.socket | None:
        """Wrap ``sock`` in TLS when its first byte is a TLS handshake; None to drop it."""
        if self.ssl_context is None:
            return sock
        sock.settimeout(self.cfg.node.network_timeout_s)
        first = sock.recv(1, socket.MSG_PEEK)
        if looks_like_tls(first):
            try:
                return self.ssl_context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                LOG.warning("TLS handshake failed: %s", exc.__class__.__name__)
                return None
        if self.cfg.tls.require:
            LOG.warning("plain connection refused: TLS is required")
            return None
        return sock

    def stop(self) -> None:
        """Stop accepting, abort open associations, close the socket."""
        if self.fast is not None:
            self.fast.stop()
            self.fast = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            if self.server in self.ae._servers:
                self.ae._servers.remove(self.server)
            for assoc in self.ae.active_associations:
                assoc.abort()
            self.server = None

    # ---- event handlers ------------------------------------------------------------------
    def _on_established(self, event: Any) -> None:
        with self._stats_lock:
            self.stats["associations"] += 1

    def _on_released(self, event: Any) -> None:
        self._released(getattr(event.assoc, "dicomnode_id", ""))

    def _released(self, assoc_id: str) -> None:
        try:
            series = self.db.association_released(assoc_id)
        except Exception:  # the series still completes by quiet period
            LOG.exception("could not record association release")
            return
        if series and self.on_release is not None:
            self.on_release(series)

    def _on_store(self, event: Any) -> int:
        """pynetdicom C-STORE handler."""
        req = event.request
        ds = req.DataSet
        raw = ds.getbuffer() if hasattr(ds, "getbuffer") else memoryview(ds.getvalue())
        status, _comment = self.store_instance(
            str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax), str(event.assoc.requestor.ae_title).strip(),
            getattr(event.assoc, "dicomnode_id", ""), [raw])
        return status

    def store_instance(self, sop_class: str, sop_uid: str, ts: str, calling: str, assoc_id: str,
                       chunks: list[Any]) -> tuple[int, str]:
        """Store one received data set (``chunks`` = its encoded bytes, as received).

        Returns (status, PHI-free error comment). Never raises: every failure is a status.
        """
        try:
            return self._store(sop_class, sop_uid, ts, calling, assoc_id, chunks), ""
        except InstanceRejected as exc:
            with self._stats_lock:
                self.stats["rejected"] += 1
            LOG.warning("C-STORE refused 0x%04X: %s", exc.status, exc.reason)
            return exc.status, exc.reason
        except Exception as exc:  # database errors, unexpected OS errors: nothing acknowledged
            with self._stats_lock:
                self.stats["rejected"] += 1
            LOG.error("C-STORE failed (%s): answered 0xA700", exc.__class__.__name__)
            return dimse.STATUS_OUT_OF_RESOURCES, "node could not store the instance"

    def _store(self, sop_class: str, sop_uid: str, ts: str, calling: str, assoc_id: str, chunks: list[Any]) -> int:
        if sop_class not in dimse.IMAGE_STORAGE_SOP_CLASSES:
            raise InstanceRejected(dimse.STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
        if not valid_uid(sop_uid):
            raise InstanceRejected(dimse.STATUS_CANNOT_UNDERSTAND, "invalid SOP instance UID")
        if ts not in _ACCEPTED_TS:
            raise InstanceRejected(dimse.STATUS_CANNOT_UNDERSTAND, "transfer syntax not accepted")
        size = sum(len(c) for c in chunks)
        if size == 0:
            raise InstanceRejected(dimse.STATUS_CANNOT_UNDERSTAND, "empty dataset")
        meta_bytes = file_meta_bytes(sop_class, sop_uid, ts, calling)
        h = header_from_chunks(chunks, ts, meta_bytes, sop_class=sop_class, sop_instance=sop_uid)
        rel = self.spool.relative_path(h["study"], h["series"], sop_uid)
        size = self.spool.write(rel, (meta_bytes, *chunks))
        meta = InstanceMeta(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class, series_instance_uid=h["series"],
            study_instance_uid=h["study"], transfer_syntax_uid=ts, modality=h["modality"], path=rel,
            size_bytes=size, instance_number=h["number"], position=h["position"],  # type: ignore[arg-type]
            orientation=h["orientation"], frames=h["frames"], frame_of_reference_uid=h["for_uid"],
            calling_ae=calling, association_id=assoc_id, received_at=time.time(),
        )
        new = self.db.add_instance(meta)
        with self._stats_lock:
            self.stats["stored" if new else "duplicates"] += 1
        if not new:
            LOG.debug("duplicate instance stored once (series %s)", series_key(h["series"]))
        return dimse.STATUS_SUCCESS


def index_orphans(db: Database, spool: Spool) -> int:
    """Index spool files that have no database row (commits lost to a power failure).

    Unreadable files are moved aside to ``<spool>/.orphans`` (they were never acknowledged).
    Returns the number of files indexed. Database errors propagate.
    """
    known = db.instance_paths()  # type: ignore[attr-defined]
    count = 0
    for rel in spool.files():
        if rel in known:
            continue
        path = spool.abspath(rel)
        try:
            data = path.read_bytes()
            fm = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=[]).file_meta
            sop_class, sop_uid = str(fm.MediaStorageSOPClassUID), str(fm.MediaStorageSOPInstanceUID)
            h = parse_header(data, sop_class=sop_class, sop_instance=sop_uid)
            if spool.relative_path(h["study"], h["series"], sop_uid) != rel:
                raise InstanceRejected(dimse.STATUS_DATASET_MISMATCH, "path does not match the header")
        except Exception:
            aside = spool.root / ".orphans"
            aside.mkdir(exist_ok=True)
            path.replace(aside / path.name)
            LOG.warning("unreadable spool file moved aside")
            continue
        db.add_instance(InstanceMeta(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class, series_instance_uid=h["series"],
            study_instance_uid=h["study"], transfer_syntax_uid=str(fm.TransferSyntaxUID), modality=h["modality"],
            path=rel, size_bytes=len(data), instance_number=h["number"], position=h["position"],
            orientation=h["orientation"], frames=h["frames"], frame_of_reference_uid=h["for_uid"],
            calling_ae=str(fm.get("SourceApplicationEntityTitle", "") or ""), association_id="recovered",
            received_at=time.time()))
        count += 1
    return count
