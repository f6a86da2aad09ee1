"""Loading a PKCS#11 module, chosen by profile name, by path, or automatically."""

from __future__ import annotations

import ctypes
import os
import threading

import pkcs11
from pkcs11.exceptions import PKCS11Error

from dicom_card_agent.card.pcsc import PcscdStuck, PcscUnavailable, readers_with_a_card
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.file_trust import check_trusted_file
from dicom_card_agent.token.profiles import (
    AUTO,
    AUTO_ORDER,
    GENERIC,
    ModuleProfile,
    all_profiles,
    detect_profile,
    get_profile,
)
from dicom_card_agent.token.search_ends import hide_failed_search_ends


class ModuleLoadError(CardAgentError):
    """The PKCS#11 module cannot be found or loaded."""


class ModuleStartError(ModuleLoadError):
    """The PKCS#11 module loaded, but its ``C_Initialize`` failed: its own configuration or service
    is missing, not the module."""


class ModuleWaitsForPcscd(ModuleStartError):
    """The module was not started: pcscd, through which it reads cards, does not answer now (stopped,
    or stuck); it may later."""


# One thread at a time in the PKCS#11 module. The supervisor polls the reader while a sign-in runs
# in a thread of its own, and SoftHSM answered CKR_GENERAL_ERROR to a slot poll made while another
# thread logged in (which the card loop took for a pulled card). Every PKCS#11 call of the
# supervisor holds this; a sign-in asks for the PIN only after letting go of it, so that the reader
# is still watched while the dialog is open. Another process's login (the card-session process's)
# cannot be held off by this lock and still makes SoftHSM fail a poll now and then: the card loop
# takes such an error for a failed look, not a pulled card (agent/card/watcher.py).
MODULE_CALLS = threading.Lock()


class LoadedModule:
    """A PKCS#11 module for this process, with the profile that describes it. The module is
    initialised (``C_Initialize``) when :attr:`lib` is first used, unless it was at loading: OpenSC
    probes every card present as it initialises (37 APDUs on the virtual CAC), so the supervisor,
    which needs only the path and the profile while pcscd tells it of cards (``presence = "pcsc"``),
    leaves that probe to the card-session process."""

    def __init__(self, path: str, profile: ModuleProfile, lib: pkcs11.lib | None = None) -> None:
        self.path = path
        self.profile = profile
        self._lib = lib
        self._lib_lock = threading.Lock()

    @property
    def lib(self) -> pkcs11.lib:
        """The module, initialised (raises :class:`ModuleLoadError` when it cannot be)."""
        with self._lib_lock:
            if self._lib is None:
                self._lib = _initialise(self.path, self.profile)
            return self._lib

    @property
    def uninitialised(self) -> bool:
        with self._lib_lock:
            return self._lib is None

    @property
    def library_description(self) -> str:
        return f"{self.lib.manufacturer_id} {self.lib.library_description}".strip()

    def slots_with_token(self) -> list:
        return self.lib.get_slots(token_present=True)

    def all_slots(self) -> list:
        """Every slot, with a token or not (an empty card reader is one)."""
        return self.lib.get_slots(token_present=False)


def _load(path: str, profile: ModuleProfile | None, initialise: bool = True) -> LoadedModule:
    profile_text = f" (profile {profile.name})" if profile else ""
    if not os.path.exists(path):
        hint = (
            f"; the {profile.name} profile looks in: {', '.join(profile.module_paths)}"
            if profile and profile.module_paths
            else ""
        )
        raise ModuleLoadError(
            f"PKCS#11 module {path}{profile_text} does not exist{hint}. Install the module's "
            "package or set the module to its path"
        )
    # The module runs inside the agent, which holds the PIN: a module someone else can write is theirs.
    check_trusted_file(path, "the PKCS#11 module", "run code in the agent, which holds the card's PIN")
    if profile is None:
        profile = detect_profile(path)  # by path; by the manufacturer it names once initialised, below
    if not initialise and profile.presence_from_pcsc:
        _check_loadable(path, profile)  # what initialising would have caught at start-up, but a probe
        return LoadedModule(path, profile)
    lib = _initialise(path, profile)
    if profile.name == GENERIC:
        profile = detect_profile(path, lib.manufacturer_id)
    return LoadedModule(path, profile, lib)


def _card_in_a_reader() -> bool:
    try:
        return bool(readers_with_a_card())
    except PcscUnavailable:  # no pcscd: no card this module could show
        return False


def _initialise(path: str, profile: ModuleProfile) -> pkcs11.lib:
    hide_failed_search_ends()  # before the module's first object search
    if profile.presence_from_pcsc:
        _refuse_a_stuck_pcscd(path, profile)
    try:
        return pkcs11.lib(path)
    except PKCS11Error as error:
        if type(error) is PKCS11Error:  # python-pkcs11's own: the file is no PKCS#11 library for this machine
            raise _not_loadable(path, profile, error) from None
        # A return code's class: the library loaded and C_Initialize refused. These carry no text, the
        # name of the return code is what there is to tell.
        hint = profile.start_failure_hint or ("The module's own configuration or service is the likely cause, "
                                              "and the module may have written why to the system log")
        raise ModuleStartError(f"PKCS#11 module {path} (profile {profile.name}) did not start: its C_Initialize "
                              f"answered {type(error).__name__}. {hint}") from None


def _refuse_a_stuck_pcscd(path: str, profile: ModuleProfile) -> None:
    """:class:`ModuleWaitsForPcscd` when pcscd, through which the module reads cards, takes connections and
    answers nothing: the module's C_Initialize would wait for it without end (measured: `card-agent
    doctor`, `check` and `tokens` hung for as long as pcscd was stopped, without a word)."""
    try:
        readers_with_a_card()
    except PcscdStuck as error:
        raise ModuleWaitsForPcscd(f"PKCS#11 module {path} (profile {profile.name}) was not started: it reads cards "
                               f"through pcscd, and {error}; it would wait for pcscd without end. "
                               f"{error.remedy[0].upper()}{error.remedy[1:]}") from None
    except PcscUnavailable:  # not there at all: the module finds no reader, at once
        pass


def _check_loadable(path: str, profile: ModuleProfile) -> None:
    """The module can be loaded and is a PKCS#11 library (it has ``C_GetFunctionList``), checked
    without initialising it."""
    try:
        library = ctypes.CDLL(path)
        library.C_GetFunctionList  # noqa: B018 - looked up to fail now, not at the first card
    except (OSError, AttributeError) as error:
        raise _not_loadable(path, profile, error) from None


def _not_loadable(path: str, profile: ModuleProfile, error: Exception) -> ModuleLoadError:
    return ModuleLoadError(f"cannot load PKCS#11 module {path} (profile {profile.name}): {error}. Check that it is "
                           "a PKCS#11 library for this architecture")


def load_module(spec: str = AUTO, *, initialise: bool = True) -> LoadedModule:
    """Load a module given as a profile name, a path to a ``.so``, or ``auto``.

    ``auto`` loads the installed modules of the known profiles in :data:`AUTO_ORDER` and takes the
    first that shows a token; with no token anywhere, the first installed one. ``initialise``
    False: a module whose profile says ``presence = "pcsc"`` is initialised only when first used
    (see :class:`LoadedModule`); ``auto`` then counts a card in a reader, as pcscd tells, as its
    token, since asking the module would make it read the card.
    """
    if spec == AUTO:
        return _load_auto(initialise)
    if os.sep in spec or spec.endswith((".so", ".dylib", ".dll")):
        return _load(spec, None, initialise)
    profile = get_profile(spec)
    path = profile.installed_module()
    if path is None:
        raise ModuleLoadError(
            f"the PKCS#11 module of profile {profile.name} ({profile.description}) is not installed: "
            f"looked for {', '.join(profile.module_paths) or 'no known path'}. Install it or give its path"
        )
    return _load(path, profile, initialise)


def _load_auto(initialise: bool) -> LoadedModule:
    profiles = all_profiles()
    candidates = [(profiles[name], profiles[name].installed_module()) for name in AUTO_ORDER]
    installed = [(profile, path) for profile, path in candidates if path]
    if not installed:
        raise ModuleLoadError(
            "no PKCS#11 module found: install OpenSC (smart cards: `apt-get install opensc pcscd`) "
            "or give the module with --module NAME|PATH; known profiles: " + ", ".join(sorted(profiles))
        )
    loaded = []
    for profile, path in installed:
        try:
            module = _load(path, profile, initialise)
        except ModuleLoadError:
            continue
        if _card_in_a_reader() if module.uninitialised else module.slots_with_token():
            return module
        loaded.append(module)
    if not loaded:
        raise ModuleLoadError(
            "none of the installed PKCS#11 modules could be loaded: "
            + ", ".join(path for _, path in installed)
        )
    return loaded[0]
