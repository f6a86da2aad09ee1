"""The ``[desktop]`` table of the agent's configuration (docs/configuration.md)::

    [desktop]
    notifications = true                  # desktop notifications (freedesktop D-Bus); false: none
    site_label = "Radiology PACS"         # what the PIN is for, in the dialog and the notifications
    helpdesk = "the IT service desk, extension 4444"   # who to call about a blocked card
    pinentry = ["pinentry-gnome3", "pinentry-qt", "pinentry-gtk-2"]  # graphical ones to try, in order

Unknown keys are errors naming the key, as everywhere in the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicom_card_agent.errors import ConfigError

GRAPHICAL_PINENTRIES = ("pinentry-gnome3", "pinentry-qt", "pinentry-gtk-2")
DEFAULT_HELPDESK = "your IT service desk"
_KEYS = {"notifications", "site_label", "helpdesk", "pinentry"}
# Characters at most: each is a part of a sentence in the PIN dialog and the notifications.
TEXT_LENGTHS = {"site_label": 100, "helpdesk": 200}


@dataclass(frozen=True)
class DesktopConfig:
    notifications: bool = True
    site_label: str = ""  # "": the tunnel names say what the PIN is for
    helpdesk: str = DEFAULT_HELPDESK
    pinentry: tuple[str, ...] = GRAPHICAL_PINENTRIES  # tried in order in a graphical session


def parse_desktop_config(data: dict[str, Any] | None, where: str) -> DesktopConfig:
    """The ``[desktop]`` table (absent: the defaults); ``where`` names the file in errors."""
    if data is None:
        return DesktopConfig()
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(f"{where} [desktop]: unknown key(s) {', '.join(sorted(unknown))}; see docs/configuration.md")
    notifications = data.get("notifications", True)
    if not isinstance(notifications, bool):
        raise ConfigError(f"{where} [desktop].notifications: must be true or false, not {notifications!r}")
    texts = {}
    for key, default in (("site_label", ""), ("helpdesk", DEFAULT_HELPDESK)):
        value = data.get(key, default)
        if not isinstance(value, str) or "\n" in value:
            raise ConfigError(f"{where} [desktop].{key}: must be a one-line string, not {value!r}")
        if len(value.strip()) > TEXT_LENGTHS[key]:
            raise ConfigError(f"{where} [desktop].{key}: {len(value.strip())} characters, where at most "
                              f"{TEXT_LENGTHS[key]} fit in the sentence of the PIN dialog and the notifications "
                              "that shows it: shorten it")
        texts[key] = value.strip() or default
    programs = data.get("pinentry", list(GRAPHICAL_PINENTRIES))
    if isinstance(programs, str):
        programs = [programs]
    if not isinstance(programs, list) or not programs or not all(isinstance(p, str) and p for p in programs):
        raise ConfigError(f"{where} [desktop].pinentry: must be a list of pinentry programs to try in a graphical "
                          f"session, e.g. {list(GRAPHICAL_PINENTRIES)!r}, not {programs!r}")
    return DesktopConfig(notifications=notifications, site_label=texts["site_label"], helpdesk=texts["helpdesk"],
                         pinentry=tuple(programs))
