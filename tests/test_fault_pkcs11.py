"""Tests of tests/fault_pkcs11: the fault-injecting PKCS#11 module over a real SoftHSM.

python-pkcs11 keeps one loaded module per process and SoftHSM only sees tokens
created before its C_Initialize, so every scenario runs its PKCS#11 client code
in a fresh Python subprocess (see ``run_client``) while the control file is
changed from inside that subprocess or between subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HELPER_DIR = Path(__file__).resolve().parent / "fault_pkcs11"
sys.path.insert(0, str(HELPER_DIR))  # tests/ is not a package: import the helper by path
import faultmodule  # noqa: E402
from faultmodule import (  # noqa: E402
    CKF_PROTECTED_AUTHENTICATION_PATH,
    CKF_USER_PIN_COUNT_LOW,
    CKF_USER_PIN_FINAL_TRY,
    CKF_USER_PIN_LOCKED,
    FaultControl,
)

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
PROVIDER = "/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so"
# Test-only, well-known PINs of throw-away SoftHSM tokens living in tmp dirs.
USER_PIN = "123456"
SO_PIN = "12345678"
PIN_FLAGS = CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed"),
    pytest.mark.skipif(shutil.which("softhsm2-util") is None or not os.path.exists(SOFTHSM_LIB),
                       reason="softhsm2 not installed"),
]


@pytest.fixture(scope="module")
def wrapper() -> Path:
    return faultmodule.build(HELPER_DIR / "build")


@pytest.fixture(scope="module")
def hsm(tmp_path_factory) -> dict[str, str]:
    """A private SoftHSM with tokens alice and bob, each holding an RSA key pair (id 01, label tls)."""
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in ("alice", "bob"):
        # softhsm2-util reads PINs from the terminal only; these are test-only PINs on argv.
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", USER_PIN, "--so-pin", SO_PIN],
                       env=env, check=True, capture_output=True)
    keygen = textwrap.dedent(f"""
        import pkcs11
        from pkcs11 import KeyType
        lib = pkcs11.lib({SOFTHSM_LIB!r})
        for label in ("alice", "bob"):
            with lib.get_token(token_label=label).open(rw=True, user_pin={USER_PIN!r}) as s:
                s.generate_keypair(KeyType.RSA, 2048, store=True, label="tls", id=b"\\x01")
    """)
    subprocess.run([sys.executable, "-c", keygen], env=env, check=True, capture_output=True, timeout=60)
    return {"SOFTHSM2_CONF": str(conf)}


@pytest.fixture
def ctl(tmp_path) -> FaultControl:
    return FaultControl(tmp_path / "card.ctl")


PRELUDE = f"""
import json, os, sys, time
sys.path.insert(0, {str(HELPER_DIR)!r})
import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass, PROTECTED_AUTH
from pkcs11 import exceptions as E
from faultmodule import FaultControl
PIN = {USER_PIN!r}
lib = pkcs11.lib(os.environ["TEST_FAULT_PKCS11_SO"])
ctl = FaultControl(os.environ["FAULT_PKCS11_CONTROL"])
out = {{}}

def err(fn, *args, **kw):
    # name of the PKCS11Error raised by fn, or None
    try:
        r = fn(*args, **kw)
        if hasattr(r, "__next__"):
            list(r)
    except E.PKCS11Error as e:
        return type(e).__name__
    return None

def token_flags(label):
    return int(lib.get_token(token_label=label).flags)

def private_keys(session):
    return len(list(session.get_objects({{Attribute.CLASS: ObjectClass.PRIVATE_KEY}})))

def sign(session):
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="tls")
    return key.sign(b"x" * 32, mechanism=Mechanism.SHA256_RSA_PKCS)
"""


def client_env(hsm: dict[str, str], ctl: FaultControl, so: Path) -> dict[str, str]:
    return {**os.environ, **hsm, **ctl.env(), "TEST_FAULT_PKCS11_SO": str(so)}


def run_client(hsm, ctl, so, code: str) -> dict:
    script = PRELUDE + textwrap.dedent(code) + "\nprint('RESULT ' + json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=client_env(hsm, ctl, so),
                          capture_output=True, text=True, timeout=30)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        pytest.fail(f"client failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(results[-1][len("RESULT "):])


# ------------------------------------------------------------------ build


def test_build_is_cached_and_warning_free(wrapper, tmp_path):
    assert wrapper.is_file()
    mtime = wrapper.stat().st_mtime_ns
    assert faultmodule.build(HELPER_DIR / "build") == wrapper
    assert wrapper.stat().st_mtime_ns == mtime
    proc = subprocess.run(["gcc", *faultmodule.CFLAGS, "-Wpedantic", "-Werror", "-o", str(tmp_path / "w.so"),
                           str(HELPER_DIR / "fault_pkcs11.c"), "-ldl", "-lpthread"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    nm = subprocess.run(["nm", "-D", "--defined-only", str(wrapper)], capture_output=True, text=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if " T " in line}
    assert "C_GetFunctionList" in exported
    assert "C_GetInterface" not in exported  # callers must fall back to the wrapped v2.40 list


def test_build_reports_compiler_errors(tmp_path):
    with pytest.raises(faultmodule.BuildError, match="exit 1"):
        faultmodule.build(tmp_path, cc="false")


def test_control_file_helpers(ctl):
    ctl.set(sign_delay_ms=5, present=True)
    ctl.fail("C_Sign", "CKR_DEVICE_REMOVED")
    ctl.fail("Login", 0x30)
    ctl.fail("C_Sign", "DEVICE_ERROR")
    keys = ctl.keys()
    assert keys["fail"] == "C_Login:0x30,C_Sign:CKR_DEVICE_ERROR"
    assert keys["sign_delay_ms"] == "5" and keys["present"] == "1"
    ctl.remove_card()
    ctl.insert_card()
    assert ctl.keys()["generation"] == "2"
    ctl.clear()
    assert set(ctl.keys()) == {"log", "generation"}
    assert [p.name for p in ctl.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(ValueError):
        ctl.set(show_token="a\nfail = C_Sign:0x5")


# --------------------------------------------------------------- scenarios


def test_pin_retry_counter(hsm, wrapper, ctl):
    ctl.pin_retries(3)
    first = run_client(hsm, ctl, wrapper, """
        tok = lib.get_token(token_label="alice")
        out["start"] = token_flags("alice")
        out["wrong1"] = err(tok.open, user_pin="000000")
        out["flags1"] = token_flags("alice")
        out["wrong2"] = err(tok.open, user_pin="000000")
        out["flags2"] = token_flags("alice")
    """)
    assert first["start"] & PIN_FLAGS == 0
    assert first["wrong1"] == "PinIncorrect"
    assert first["flags1"] & PIN_FLAGS == CKF_USER_PIN_COUNT_LOW
    assert first["wrong2"] == "PinIncorrect"
    assert first["flags2"] & PIN_FLAGS == CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY
    assert ctl.pin_remaining() == 1

    # a new process sees the same counter, like a card would
    second = run_client(hsm, ctl, wrapper, """
        tok = lib.get_token(token_label="alice")
        out["start"] = token_flags("alice")
        out["wrong3"] = err(tok.open, user_pin="000000")
        out["flags3"] = token_flags("alice")
        out["correct"] = err(tok.open, user_pin=PIN)
    """)
    assert second["start"] & PIN_FLAGS == CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY
    assert second["wrong3"] == "PinIncorrect"
    assert second["flags3"] & CKF_USER_PIN_LOCKED
    assert second["correct"] == "PinLocked"
    logins = [line for line in ctl.log_lines() if line.startswith("C_Login")]
    assert logins[-1].startswith("C_Login rv=0xa4 ")  # locked: not passed to the real module
    assert USER_PIN not in "\n".join(ctl.log_lines())

    ctl.reset_pin_counter()
    third = run_client(hsm, ctl, wrapper, """
        tok = lib.get_token(token_label="alice")
        out["start"] = token_flags("alice")
        out["wrong"] = err(tok.open, user_pin="000000")
        out["flags_low"] = token_flags("alice")
        with tok.open(user_pin=PIN) as s:
            out["keys"] = private_keys(s)
        out["flags_reset"] = token_flags("alice")
    """)
    assert third["start"] & PIN_FLAGS == 0
    assert third["wrong"] == "PinIncorrect"
    assert third["flags_low"] & PIN_FLAGS == CKF_USER_PIN_COUNT_LOW
    assert third["keys"] == 1
    assert third["flags_reset"] & PIN_FLAGS == 0
    assert ctl.pin_remaining() == 3


def test_removal_invalidates_sessions(hsm, wrapper, ctl):
    res = run_client(hsm, ctl, wrapper, """
        tok = lib.get_token(token_label="alice")
        slot = tok.slot
        old = tok.open(user_pin=PIN)
        out["before"] = private_keys(old)
        ctl.remove_card()
        out["present_slots"] = len(lib.get_slots(token_present=True))
        out["slot_flags"] = [int(s.flags) for s in lib.get_slots() if s.slot_id == slot.slot_id][0]
        out["token_info"] = err(slot.get_token)
        out["old_session"] = err(private_keys, old)
        out["old_sign"] = err(sign, old)
        out["new_session"] = err(tok.open)
        ctl.insert_card()
        out["present_after"] = [s.get_token().label for s in lib.get_slots(token_present=True)]
        out["old_after"] = err(private_keys, old)
        tok = lib.get_token(token_label="alice")
        with tok.open() as s:
            out["not_logged_in"] = private_keys(s)   # the re-inserted card needs a new login
        with tok.open(user_pin=PIN) as s:
            out["after"] = private_keys(s)
            out["sig_len"] = len(sign(s))
        out["close_old"] = err(old.close)
    """)
    assert res["before"] == 1
    assert res["present_slots"] == 0
    assert res["slot_flags"] & 1 == 0  # CKF_TOKEN_PRESENT cleared
    assert res["token_info"] == "TokenNotPresent"
    assert res["old_session"] == "SessionHandleInvalid"
    assert res["old_sign"] == "SessionHandleInvalid"
    assert res["new_session"] == "TokenNotPresent"
    assert "alice" in res["present_after"]
    assert res["old_after"] == "SessionHandleInvalid"
    assert res["not_logged_in"] == 0
    assert res["after"] == 1 and res["sig_len"] == 256
    assert res["close_old"] == "SessionHandleInvalid"
    assert any(line.startswith("EVENT") and "present=0" in line for line in ctl.log_lines())


def test_show_token_swaps_cards(hsm, wrapper, ctl):
    ctl.show("alice")
    res = run_client(hsm, ctl, wrapper, """
        def visible():
            return [[s.slot_id, s.get_token().label] for s in lib.get_slots(token_present=True)]
        out["alice"] = visible()
        s = lib.get_token().open(user_pin=PIN)
        ctl.show("bob")
        out["bob"] = visible()
        out["old_session"] = err(private_keys, s)
        with lib.get_token().open(user_pin=PIN) as s2:   # bob needs its own login
            out["bob_keys"] = private_keys(s2)
        ctl.show("nobody")
        out["nobody"] = visible()
        out["nobody_slots"] = [[sl.slot_id, int(sl.flags) & 1] for sl in lib.get_slots()]
        ctl.show(None)
        out["all"] = sorted(s.get_token().label for s in lib.get_slots(token_present=True))
    """)
    assert res["alice"] == [[0, "alice"]]
    assert res["bob"] == [[0, "bob"]]
    assert res["old_session"] == "SessionHandleInvalid"
    assert res["bob_keys"] == 1
    assert res["nobody"] == []
    assert res["nobody_slots"] == [[0, 0]]
    assert {"alice", "bob"} <= set(res["all"])


def test_show_token_list_is_several_readers_each_pulled_alone(hsm, wrapper, ctl):
    ctl.readers("alice", None)  # reader 0: alice; reader 1: empty
    res = run_client(hsm, ctl, wrapper, """
        def visible():
            return [[s.slot_id, s.get_token().label] for s in lib.get_slots(token_present=True)]
        out["one"] = visible()
        out["slots"] = [[sl.slot_id, int(sl.flags) & 1] for sl in lib.get_slots()]
        a = lib.get_token(token_label="alice").open(user_pin=PIN)
        ctl.readers("alice", "bob")  # bob's card into reader 1: alice's session lives on
        out["two"] = visible()
        out["alice_after_insert"] = private_keys(a)
        b = lib.get_token(token_label="bob").open(user_pin=PIN)
        ctl.readers(None, "bob")  # alice's card pulled: her session dies, bob's lives on
        out["after_pull"] = visible()
        out["alice_after_pull"] = err(private_keys, a)
        out["bob_after_pull"] = private_keys(b)
    """)
    assert res["one"] == [[0, "alice"]]
    assert res["slots"] == [[0, 1], [1, 0]]
    assert res["two"] == [[0, "alice"], [1, "bob"]]
    assert res["alice_after_insert"] == 1
    assert res["after_pull"] == [[1, "bob"]]
    assert res["alice_after_pull"] == "SessionHandleInvalid"
    assert res["bob_after_pull"] == 1
    logins = [line for line in ctl.log_lines() if line.startswith("C_Login")]
    assert [line.split()[-2] for line in logins] == ["token=alice", "token=bob"]


def test_injected_failures(hsm, wrapper, ctl):
    res = run_client(hsm, ctl, wrapper, """
        s = lib.get_token(token_label="alice").open(user_pin=PIN)
        out["ok1"] = len(sign(s))
        ctl.fail("C_Sign", "CKR_DEVICE_REMOVED")
        out["sign"] = err(sign, s)
        ctl.fail("C_Sign", None)
        out["ok2"] = len(sign(s))          # the failed operation did not stay active
        for fn, ckr in [("C_SignInit", "CKR_DEVICE_ERROR"), ("C_FindObjectsInit", "CKR_GENERAL_ERROR"),
                        ("C_GetAttributeValue", "0xb3")]:
            ctl.fail(fn, ckr)
            out[fn] = err(sign, s)
            ctl.fail(fn, None)
        s.close()
        tok = lib.get_token(token_label="alice")
        ctl.fail("C_OpenSession", "CKR_TOKEN_NOT_PRESENT")
        out["C_OpenSession"] = err(tok.open)
        ctl.fail("C_OpenSession", None)
        ctl.fail("C_Login", "CKR_DEVICE_REMOVED")
        out["C_Login"] = err(tok.open, user_pin=PIN)
        ctl.fail("C_Login", None)
        ctl.fail("C_GetTokenInfo", "CKR_DEVICE_ERROR")
        out["C_GetTokenInfo"] = err(tok.slot.get_token)
        ctl.clear()
        with tok.open(user_pin=PIN) as s:
            out["ok3"] = len(sign(s))
    """)
    assert res["ok1"] == res["ok2"] == res["ok3"] == 256
    assert res["sign"] == "DeviceRemoved"
    assert res["C_SignInit"] == "DeviceError"
    assert res["C_FindObjectsInit"] == "GeneralError"
    assert res["C_GetAttributeValue"] == "SessionHandleInvalid"
    assert res["C_OpenSession"] == "TokenNotPresent"
    assert res["C_Login"] == "DeviceRemoved"
    assert res["C_GetTokenInfo"] == "DeviceError"
    assert ctl.signatures() == 3   # injected failures and size queries do not count
    assert any("C_Sign rv=0x32 injected" in line for line in ctl.log_lines())


def test_sign_delay(hsm, wrapper, ctl):
    res = run_client(hsm, ctl, wrapper, """
        s = lib.get_token(token_label="alice").open(user_pin=PIN)
        sign(s)
        ctl.sign_delay(300)
        t0 = time.monotonic()
        sign(s)
        out["slow"] = time.monotonic() - t0
        s.close()
    """)
    assert res["slow"] >= 0.3
    assert ctl.signatures() == 2


def test_pin_pad_and_token_flags(hsm, wrapper, ctl):
    ctl.pin_pad(USER_PIN)
    ctl.token_flags(set=faultmodule.CKF_PROTECTED_AUTHENTICATION_PATH, clear=0x4)  # clear CKF_LOGIN_REQUIRED
    res = run_client(hsm, ctl, wrapper, """
        out["flags"] = token_flags("alice")
        with lib.get_token(token_label="alice").open(user_pin=PROTECTED_AUTH) as s:
            out["keys"] = private_keys(s)
        ctl.pin_pad(None)
        out["no_pin"] = err(lib.get_token(token_label="alice").open, user_pin=PROTECTED_AUTH)
    """)
    assert res["flags"] & CKF_PROTECTED_AUTHENTICATION_PATH
    assert res["flags"] & 0x4 == 0
    assert res["keys"] == 1
    assert res["no_pin"] == "PinIncorrect"
    logins = [line for line in ctl.log_lines() if line.startswith("C_Login")]
    assert logins[0].startswith("C_Login rv=0x0 user=1 pinpad")
    assert USER_PIN not in "\n".join(ctl.log_lines())


def test_wait_for_slot_event(hsm, wrapper, ctl):
    # python-pkcs11's wait_for_slot_event is broken (design notes, section 2): use ctypes.
    res = run_client(hsm, ctl, wrapper, """
        import ctypes, threading
        watchdog = threading.Timer(10, os._exit, (3,))   # a blocking wait must not hang the test
        watchdog.daemon = True
        watchdog.start()
        so = ctypes.CDLL(os.environ["TEST_FAULT_PKCS11_SO"])
        plist = ctypes.c_void_p()
        assert so.C_GetFunctionList(ctypes.byref(plist)) == 0
        fns = ctypes.cast(plist, ctypes.POINTER(ctypes.c_void_p))   # [0] = CK_VERSION (padded)
        init = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(fns[1])
        wait = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong),
                                ctypes.c_void_p)(fns[68])
        slot = ctypes.c_ulong(99)
        rv = init(None)
        out["init"] = rv if rv != 0x191 else 0     # python-pkcs11 already initialised it
        out["idle"] = wait(1, ctypes.byref(slot), None)
        ctl.show("alice")
        ctl.remove_card()
        out["removed"] = wait(1, ctypes.byref(slot), None)
        out["slot"] = slot.value
        out["again"] = wait(1, ctypes.byref(slot), None)
        threading.Timer(0.1, ctl.insert_card).start()
        t0 = time.monotonic()
        out["blocking"] = wait(0, ctypes.byref(slot), None)
        out["waited"] = time.monotonic() - t0
    """)
    assert res["init"] == 0
    assert res["idle"] == 0x8            # CKR_NO_EVENT
    assert res["removed"] == 0 and res["slot"] == 0
    assert res["again"] == 0x8
    assert res["blocking"] == 0
    assert 0.05 < res["waited"] < 5


# ---------------------------------------------------------------- OpenSSL


@pytest.mark.skipif(not os.path.exists(PROVIDER) or shutil.which("openssl") is None,
                    reason="OpenSSL pkcs11-provider not installed")
def test_openssl_pkcs11_provider_uses_wrapper(hsm, wrapper, ctl, tmp_path):
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(textwrap.dedent(f"""\
        openssl_conf = openssl_init
        [openssl_init]
        providers = provider_sect
        [provider_sect]
        default = default_sect
        pkcs11 = pkcs11_sect
        [default_sect]
        activate = 1
        [pkcs11_sect]
        module = {PROVIDER}
        pkcs11-module-path = {wrapper}
        pkcs11-module-quirks = no-deinit no-operation-state
        activate = 1
    """))
    env = {**client_env(hsm, ctl, wrapper), "OPENSSL_CONF": str(cnf), "PIN": USER_PIN}
    data = tmp_path / "data"
    data.write_bytes(os.urandom(32))
    pub, sig = tmp_path / "pub.pem", tmp_path / "sig"

    def openssl(*args, check=True):
        proc = subprocess.run(["openssl", *args], env=env, capture_output=True, text=True, timeout=30)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    # (OpenSSL 3.0 + pkcs11-provider 1.0 load "type=public" URIs only with -pubin.)
    openssl("pkey", "-pubin", "-in", "pkcs11:token=alice;type=public", "-pubout", "-out", str(pub))
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    store = openssl("storeutl", "-keys", "-text", "-passin", "env:PIN", "pkcs11:token=alice")
    assert "token=alice" in store.stdout
    before = ctl.signatures()
    sign = ["pkeyutl", "-sign", "-inkey", "pkcs11:token=alice;type=private", "-passin", "env:PIN",
            "-in", str(data), "-pkeyopt", "digest:sha256", "-out", str(sig)]
    openssl(*sign)
    assert ctl.signatures() == before + 1
    verify = openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-sigfile", str(sig),
                     "-in", str(data), "-pkeyopt", "digest:sha256")
    assert "Signature Verified Successfully" in verify.stdout

    ctl.fail("C_Sign", "CKR_DEVICE_REMOVED")
    assert openssl(*sign, check=False).returncode != 0
    assert ctl.signatures() == before + 1
    assert any(line.startswith("C_Sign rv=0x32 injected") for line in ctl.log_lines())
