"""Sample studies built from the DICOM files bundled in pydicom's wheel (offline), and checks that
what a peer received is what was sent.

The templates are real objects of varied kinds (CT, MR, US multi-frame, RGB, palette colour, CR,
RT Dose, Segmentation, ECG waveform, SR, RT Plan) in transfer syntaxes that every peer here stores
unchanged: Explicit and Implicit VR Little Endian (storescu sends implicit as explicit; the
values stay the same) and JPEG Baseline (storescu needs ``-xy`` to propose it). No big endian,
RLE, JPEG 2000 or JPEG-LS: storescu would have to transcode them.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, UID

# (name in pydicom's test data, what it adds to the mix); the first `files` are used in order.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("CT_small.dcm", "CT, Explicit VR LE"),
    ("MR_small_implicit.dcm", "MR, Implicit VR LE"),
    ("examples_ybr_color.dcm", "US multi-frame (30 frames), JPEG Baseline, YBR_FULL_422"),
    ("examples_rgb_color.dcm", "US RGB, Explicit VR LE"),
    ("SC_rgb_jpeg_dcmtk.dcm", "secondary capture RGB, JPEG Baseline"),
    ("rtdose.dcm", "RT Dose multi-frame (15 frames), Implicit VR LE"),
    ("examples_palette.dcm", "US palette colour, Explicit VR LE"),
    ("6154", "CR MONOCHROME1, Explicit VR LE"),
    ("liver_1frame.dcm", "Segmentation, nested sequences"),
    ("examples_overlay.dcm", "MR with overlay planes"),
    ("waveform_ecg.dcm", "12-lead ECG waveform, no pixel data"),
    ("reportsi.dcm", "Basic Text SR, no pixel data"),
    ("SC_rgb_jpeg_dcmd.dcm", "secondary capture RGB, Implicit VR LE"),
    ("rtplan.dcm", "RT Plan, Implicit VR LE"),
    ("MR_small.dcm", "MR, Explicit VR LE"),
)

PATIENT_NAME = "PEERS^TEST STUDY"
PATIENT_ID = "PEERS-0001"
_UID_LENGTH = 64          # every UID we make has exactly this length (the maximum)...
_NUMBER_LENGTH = 10       # ...and every Instance Number this many digits: clones are byte patches
_TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def new_uid() -> str:
    """A random 64-character UID under pydicom's root (fixed length: see :func:`make_study`)."""
    suffix = "1" + f"{uuid.uuid4().int % 10 ** 37:037d}"  # no leading zero in the last component
    uid = PYDICOM_ROOT_UID + suffix
    assert len(uid) == _UID_LENGTH, uid
    return uid


def template_path(name: str) -> Path:
    """The local path of a bundled pydicom test file (never downloads)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return Path(path)


@dataclass(frozen=True)
class _Template:
    name: str
    encoded: bytes
    uid_offsets: tuple[int, ...]     # SOP Instance UID in file meta and dataset
    number_offset: int               # Instance Number value


def _find_all(data: bytes, needle: bytes) -> list[int]:
    offsets, start = [], 0
    while (found := data.find(needle, start)) >= 0:
        offsets.append(found)
        start = found + 1
    return offsets


def _encode_template(name: str, index: int, study: Dataset) -> _Template:
    """The template as it will be written, with placeholder SOP Instance UID and Instance Number."""
    with warnings.catch_warnings():  # about the invalid UIDs replaced below
        warnings.simplefilter("ignore", UserWarning)
        ds = dcmread(template_path(name))
        _replace_invalid_uids(ds)
    for keyword in study.dir():  # patient and study attributes, the same in every file
        setattr(ds, keyword, study.data_element(keyword).value)
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = index + 1
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = new_uid()
    if _TRAILING_PADDING in ds:
        del ds[_TRAILING_PADDING]
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    for _attempt in range(5):  # a random placeholder may, rarely, also occur in the pixel data
        placeholder_uid, placeholder_number = new_uid(), str(uuid.uuid4().int)[:_NUMBER_LENGTH]
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = placeholder_uid
        ds.InstanceNumber = placeholder_number
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded = buffer.getvalue()
        uid_offsets = _find_all(encoded, placeholder_uid.encode())
        number_offsets = _find_all(encoded, placeholder_number.encode())
        if len(uid_offsets) == 2 and len(number_offsets) == 1:
            return _Template(name, encoded, tuple(uid_offsets), number_offsets[0])
    raise AssertionError(f"{name}: placeholders found {len(uid_offsets)}x and {len(number_offsets)}x")


def _replace_invalid_uids(ds: Dataset) -> None:
    """Some templates reference invalid UIDs (rtdose.dcm: a component with a leading zero); give
    them valid ones so the study is clean DICOM and reading it raises no warnings."""
    for element in ds.iterall():
        if element.VR != "UI" or element.value in (None, ""):
            continue
        if element.VM > 1:
            element.value = [v if UID(v).is_valid else new_uid() for v in element.value]
        elif not UID(element.value).is_valid:
            element.value = new_uid()


def _study_attributes() -> Dataset:
    study = Dataset()
    study.PatientName = PATIENT_NAME
    study.PatientID = PATIENT_ID
    study.PatientBirthDate = "19700101"
    study.PatientSex = "O"
    study.StudyInstanceUID = new_uid()
    study.StudyID = "PEERS"
    study.StudyDate = "20240101"
    study.StudyTime = "120000"
    study.AccessionNumber = f"A{uuid.uuid4().int % 10 ** 8:08d}"
    study.StudyDescription = "dicom-card-agent test study"
    study.ReferringPhysicianName = ""
    return study


def make_study(out_dir: Path, *, files: int = 12, min_total_bytes: int = 0) -> list[Path]:
    """Write one study of at least ``files`` files and ``min_total_bytes`` bytes to ``out_dir``.

    The first ``files`` (<= len(TEMPLATES)) come from different templates; more files, and those
    needed to reach ``min_total_bytes``, are further clones cycling over the templates. All files
    share one new patient and Study Instance UID; each template gets a new Series Instance UID
    (and Frame of Reference UID if it has one); each file a new SOP Instance UID and Instance
    Number. Templates are parsed and encoded once; a clone is a byte copy with the fixed-length
    UID and number patched in, so hundreds of MB take about as long as writing them.
    Returns the paths in write order (``00000-<template>.dcm``, ...).
    """
    if files < 1:
        raise ValueError("files must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = _study_attributes()
    count = min(files, len(TEMPLATES))
    templates = [_encode_template(name, i, study) for i, (name, _) in enumerate(TEMPLATES[:count])]
    paths: list[Path] = []
    total = 0
    while len(paths) < files or total < min_total_bytes:
        index = len(paths)
        template = templates[index % len(templates)]
        data = bytearray(template.encoded)
        uid = new_uid().encode()
        for offset in template.uid_offsets:
            data[offset:offset + _UID_LENGTH] = uid
        data[template.number_offset:template.number_offset + _NUMBER_LENGTH] = \
            f"{index + 1:0{_NUMBER_LENGTH}d}".encode()
        path = out_dir / f"{index:05d}-{Path(template.name).stem}.dcm"
        path.write_bytes(data)
        paths.append(path)
        total += len(data)
    return paths


# -- comparing what was sent with what was received --

DatasetSource = Path | str | Dataset


def _load(source: DatasetSource) -> Dataset:
    if isinstance(source, Dataset):
        return source
    read = getattr(source, "read", None)  # ReceivedInstance
    if callable(read) and not isinstance(source, (str, Path)):
        return read()
    return dcmread(source)


def _label(tag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _compare(a: Dataset, b: Dataset, prefix: str, top: bool, diffs: list[str]) -> None:
    for tag in sorted(set(a.keys()) | set(b.keys())):
        if (top and tag.group == 0x0002) or tag.element == 0x0000 or tag == _TRAILING_PADDING:
            continue  # file meta, group lengths, trailing padding: encoding details, not data
        label = prefix + _label(tag)
        if tag not in a or tag not in b:
            diffs.append(label)
            continue
        raw_a, raw_b = a.get_item(tag), b.get_item(tag)
        if (isinstance(raw_a, RawDataElement) and isinstance(raw_b, RawDataElement)
                and raw_a.is_little_endian and raw_b.is_little_endian and raw_a.value == raw_b.value):
            continue  # same encoded value: no need to decode it
        ea, eb = a[tag], b[tag]
        if ea.VR == "SQ" and eb.VR == "SQ":
            if len(ea.value) != len(eb.value):
                diffs.append(label)
                continue
            for i, (item_a, item_b) in enumerate(zip(ea.value, eb.value, strict=True)):
                _compare(item_a, item_b, f"{label}[{i}].", False, diffs)
        elif ea.value != eb.value:
            diffs.append(label)


def datasets_equal(sent: DatasetSource, received: DatasetSource) -> list[str]:
    """Compare two datasets element by element, recursing into sequences, and return the tags
    that differ or exist in only one, e.g. ``["(0010,0010)", "(0008,1115)[0].(0008,1150)"]``;
    an empty list means identical data.

    Ignored: group 0002 (file meta), group length elements and Data Set Trailing Padding
    (FFFC,FFFC), which are encoding details peers may change (storescp drops the padding). Values
    are equal when their little endian encodings are, or else their values as decoded by pydicom
    are, so an implicit VR file and its explicit VR copy are equal (sequence lengths may differ).
    Two files with the same transfer syntax and byte-identical datasets are equal without parsing.
    Arguments: file paths, datasets or :class:`ReceivedInstance`s.
    """
    if isinstance(sent, (str, Path)) and isinstance(received, (str, Path)):
        same = _same_encoded_dataset(Path(sent), Path(received))
        if same:
            return []
    diffs: list[str] = []
    _compare(_load(sent), _load(received), "", True, diffs)
    return diffs


def _parse_file_meta(data: bytes | memoryview) -> tuple[dict[int, str], int] | None:
    """Group 0002 string values by element number, and where the dataset starts, of a Part 10
    file's first bytes; None if it does not start like one (then let pydicom deal with it)."""
    # preamble, "DICM", then (0002,0000) UL, explicit VR little endian: tag, "UL", length 4, value
    if len(data) < 144 or bytes(data[128:132]) != b"DICM" or bytes(data[132:138]) != b"\x02\x00\x00\x00UL":
        return None
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    offset, values = 132, {}
    while offset + 8 <= min(meta_end, len(data)):
        element, vr = int.from_bytes(data[offset + 2:offset + 4], "little"), bytes(data[offset + 4:offset + 6])
        if vr in _LONG_VRS:
            length, offset = int.from_bytes(data[offset + 8:offset + 12], "little"), offset + 12
        else:
            length, offset = int.from_bytes(data[offset + 6:offset + 8], "little"), offset + 8
        if vr == b"UI":
            values[element] = bytes(data[offset:offset + length]).rstrip(b"\0 ").decode("ascii", "replace")
        offset += length
    return values, meta_end


def _encoded_dataset(path: Path) -> tuple[str, memoryview] | None:
    """(transfer syntax, dataset bytes after the file meta) of a Part 10 file, None if unusual."""
    data = memoryview(path.read_bytes())
    parsed = _parse_file_meta(data)
    if parsed is None or parsed[1] > len(data):
        return None
    values, meta_end = parsed
    return values.get(0x0010, ""), data[meta_end:]


def _same_encoded_dataset(sent: Path, received: Path) -> bool:
    """Fast path: same transfer syntax and byte-identical dataset (the usual case for a relay)."""
    try:
        a, b = _encoded_dataset(sent), _encoded_dataset(received)
    except (OSError, ValueError, EOFError):
        return False
    return a is not None and b is not None and a[0] == b[0] != "" and a[1] == b[1]


def sop_instance_uid(source: DatasetSource) -> str:
    """The SOP Instance UID of a file, dataset or received instance. For a file it is read from
    the file meta (Media Storage SOP Instance UID; :func:`datasets_equal` then compares the
    dataset's own SOP Instance UID), else from the dataset without its pixel data."""
    uid = getattr(source, "sop_instance_uid", None)
    if isinstance(uid, str):
        return uid
    if isinstance(source, Dataset):
        return str(source.SOPInstanceUID)
    with open(source, "rb") as handle:  # fast path: Media Storage SOP Instance UID of the file meta
        header = handle.read(144)
        if len(header) == 144 and header[128:132] == b"DICM":
            header += handle.read(int.from_bytes(header[140:144], "little"))
    parsed = _parse_file_meta(header)
    if parsed is not None and parsed[0].get(0x0003):
        return parsed[0][0x0003]
    return str(dcmread(source, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def match_by_sop_instance_uid(sent_files: Iterable[Path],
                              received_files: Iterable[DatasetSource]) -> dict[Path, DatasetSource | None]:
    """Pair each sent file with the received item (file, dataset or received instance) of the
    same SOP Instance UID: ``{sent_path: received or None}``, in the order of ``sent_files``.
    Received items matching no sent file are not in the result (compare the counts)."""
    received = {sop_instance_uid(item): item for item in received_files}
    return {path: received.get(sop_instance_uid(path)) for path in sent_files}


def assert_delivered(sent: list[Path], received: list) -> None:
    """Every sent file arrived once (matched by SOP Instance UID) with an identical data set."""
    assert len(received) == len(sent)
    pairs = match_by_sop_instance_uid(sent, received)
    missing = [p.name for p, r in pairs.items() if r is None]
    assert not missing, f"not received: {missing}"
    differing = {p.name: d for p, r in pairs.items() if (d := datasets_equal(p, r))}
    assert not differing, f"received datasets differ: {differing}"
