"""The wheel installs one import name, dicom_card_agent, while the repository keeps a folder per concern."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"dicom_card_agent": ROOT / "agent", "dicom_card_agent.softhsm": ROOT / "softhsm",
           "dicom_card_agent.pkcs11_profiles": ROOT / "pkcs11_profiles"}


def packages_on_disk() -> set[str]:
    names = set()
    for package, folder in FOLDERS.items():
        for marker in folder.rglob("__init__.py"):
            relative = marker.parent.relative_to(folder).parts
            names.add(".".join((package, *relative)))
    return names


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == packages_on_disk()


def source_copy(destination: Path) -> Path:
    """The repository's files (tracked or new, not ignored) without build leftovers: setuptools
    would pack a stale build/ directory's old packages into the wheel."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def test_the_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    source = source_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dicom_card_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"dicom_card_agent"}
    assert "dicom_card_agent/pkcs11_profiles/softhsm2.toml" in names
    assert "dicom_card_agent/softhsm/pki.py" in names
