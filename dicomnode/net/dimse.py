"""Shared DIMSE vocabulary: the storage SOP classes the node accepts and the transfer syntaxes.

Used by the SCP (what it accepts) and by senders (what they propose). Plain tuples of UID strings.
"""
from __future__ import annotations

from pydicom import uid as _uid

VERIFICATION = "1.2.840.10008.1.1"

#: Image storage classes a CT or MR series can contain (the images themselves, localisers and
#: the secondary captures scanners put into a series, e.g. dose screens).
IMAGE_STORAGE_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
)

#: Classes a volume can be built from (single-frame stacks and enhanced multi-frame objects).
VOLUME_SOP_CLASSES: frozenset[str] = frozenset(IMAGE_STORAGE_SOP_CLASSES[:7])

#: Output classes the node itself emits (senders propose them; the SCP does not accept them).
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"

UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    str(_uid.ExplicitVRLittleEndian),
    str(_uid.ImplicitVRLittleEndian),
    str(_uid.DeflatedExplicitVRLittleEndian),
    str(_uid.ExplicitVRBigEndian),
)

COMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    str(_uid.JPEGBaseline8Bit),
    str(_uid.JPEGExtended12Bit),
    str(_uid.JPEGLossless),
    str(_uid.JPEGLosslessSV1),
    str(_uid.JPEGLSLossless),
    str(_uid.JPEGLSNearLossless),
    str(_uid.JPEG2000Lossless),
    str(_uid.JPEG2000),
    str(_uid.HTJ2KLossless),
    str(_uid.HTJ2KLosslessRPCL),
    str(_uid.HTJ2K),
    str(_uid.RLELossless),
)

#: Everything the SCP accepts, most preferred first.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = UNCOMPRESSED_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES

#: DIMSE status codes used by the node.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122


def set_nodelay(event: object) -> None:
    """pynetdicom ``EVT_CONN_OPEN`` handler: TCP_NODELAY on the association's socket.

    Bind it on requestor associations (``ae.associate(..., evt_handlers=[(EVT_CONN_OPEN,
    set_nodelay)])``); without it each C-STORE waits ~40 ms for Nagle + delayed ACK.
    """
    import socket

    sock = getattr(getattr(getattr(event, "assoc", None), "dul", None), "socket", None)
    raw = getattr(sock, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - closed already
            pass
