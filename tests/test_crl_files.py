"""[trust] crl against a real agent: CRL files hold only CRLs, DER CRLs work, a changed CRL file
counts for the next association of the running card session, and an expired CRL is refused (or,
when configured, accepted with a warning) by file name and shown in `card-agent status`.

The PACS is `openssl s_server` with the test PKI's localhost certificate; the application sends a
real A-ASSOCIATE-RQ through the agent."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography import x509

from agent_runner import (
    associate_rq,
    port_of,
    running_agent,
    s_server,
    send_and_close,
    start_agent,
    stop_agent,
    tunnel,
    wait_for,
    write_config,
)
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import A_ASSOCIATE_RJ
from peers.pki_files import write_crl
from test_tunnel_verification import assert_accepted, assert_rejected

PACS_CERTIFICATE = "CN=localhost,O=Example Hospital Test PKI (issuer CN=Test Issuing CA,O=Example Hospital Test PKI)"


def agent_settings(crl: Path, **trust: str) -> dict:
    """Settings for :func:`running_agent`: ``crl`` as [trust] crl."""
    return {"trust": {"crl": [str(crl)], **trust}}


def associate(agent, log_mark: int) -> tuple[bytes, str]:
    """One association attempt; the answer and the agent's log lines written for it."""
    answer = send_and_close(agent.port(), associate_rq())
    wait_for(lambda: "tunnel pacs: uid" in agent.log()[log_mark:])
    return answer, agent.log()[log_mark:]


def replace_file(path: Path, new: Path) -> None:
    """As a CRL fetcher replaces the file: a new file renamed over the old one."""
    os.replace(new, path)


def test_a_certificate_in_a_crl_file_is_a_start_up_error_naming_the_file(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    """The untrusted CA's certificate and CRL appended to the issuing CA's CRL: OpenSSL took the
    certificate as a trust anchor, so a server of that CA was accepted."""
    crl = tmp_path / "crls.pem"
    crl.write_bytes(test_pki.crl.read_bytes()
                    + write_crl(test_pki.pki, tmp_path / "untrusted.crl.pem", [], ca="untrusted").read_bytes()
                    + (test_pki.pki / "untrusted-ca.pem").read_bytes())
    untrusted = {"cert": "untrusted-server-chain.pem", "key": "untrusted-server.key"}
    with s_server(test_pki, tmp_path, **untrusted) as (port, _):
        pacs = tunnel("pacs", port)
        config = write_config(tmp_path / "agent.toml", test_pki, [pacs],
                              **agent_settings(crl))
        log_path = tmp_path / "agent.log"
        process = start_agent(config, log_path, test_pki.env(CARD_PIN=USER_PIN))
        try:
            wait_for(lambda: process.poll() is not None or "ready:" in log_path.read_text(), timeout=30)
            if process.poll() is None:  # the old agent: show what the CRL file let through
                answer = send_and_close(port_of(pacs), associate_rq())
                raise AssertionError(f"the agent started with a certificate in {crl}; the untrusted server got "
                                     f"{answer[:1]!r}:\n{log_path.read_text()}")
        finally:
            stop_agent(process)
    assert process.returncode == 2
    assert (f"card-agent: error: {config} [trust].crl: CRL file {crl} holds CERTIFICATE besides CRLs: a CRL file "
            "may hold only CRLs, nothing in it is trusted (put CA certificates in [trust] ca, not in a CRL file)"
            ) in log_path.read_text()


def test_identities_refuse_a_crl_file_holding_a_certificate(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    crl = tmp_path / "crl-and-ca.pem"
    crl.write_bytes(test_pki.crl.read_bytes() + (test_pki.pki / "untrusted-ca.pem").read_bytes())
    result = run_card_agent("identities", "--module", "softhsm2", "--ca", test_pki.ca_bundle, "--crl", crl,
                            env=test_pki.env())
    assert result.returncode == 2
    assert f"CRL file {crl} holds CERTIFICATE besides CRLs" in result.stderr


def test_a_der_crl_is_used(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    current = write_crl(test_pki.pki, tmp_path / "issuing.crl", [], der=True)
    revoking = write_crl(test_pki.pki, tmp_path / "revoking.crl", [test_pki.pki / "server-chain.pem"], der=True)
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "a", [tunnel("pacs", port)],
                           **agent_settings(current)) as agent:
            assert_accepted(*associate(agent, 0))
        with running_agent(test_pki, tmp_path / "b", [tunnel("pacs", port)],
                           **agent_settings(revoking)) as agent:
            answer, log = associate(agent, 0)
    assert_rejected(answer, log, f"is not trusted: certificate {PACS_CERTIFICATE} was revoked on ")
    assert f"(reason: keyCompromise) according to CRL file {revoking}" in log


def test_a_new_crl_revoking_the_pacs_counts_without_a_new_sign_in(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    crl = write_crl(test_pki.pki, tmp_path / "issuing.crl.pem", [])
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port, session_resumption=True)],
                           **agent_settings(crl)) as agent:
            assert_accepted(*associate(agent, 0))
            replace_file(crl, write_crl(test_pki.pki, tmp_path / "new.crl.pem", [test_pki.pki / "server-chain.pem"]))
            replaced = time.monotonic()
            while True:
                mark = len(agent.log())
                answer, log = associate(agent, mark)
                if answer[:1] == bytes([A_ASSOCIATE_RJ]) or time.monotonic() - replaced > 60:
                    break
                time.sleep(0.5)
            whole_log = agent.log()
    assert_rejected(answer, log, f"server 127.0.0.1:{port} is not trusted: certificate {PACS_CERTIFICATE} was "
                                 "revoked on ")
    assert f"(reason: keyCompromise) according to CRL file {crl}" in log
    assert time.monotonic() - replaced < 60
    assert whole_log.count("card session started") == 1 and whole_log.count("signed in:") == 1, whole_log


def test_an_expired_crl_is_refused_by_default_naming_the_file(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    crl = write_crl(test_pki.pki, tmp_path / "expired.crl.pem", [], days=0)
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)],
                           **agent_settings(crl)) as agent:
            answer, log = associate(agent, 0)
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(),
                                    check=True).stdout
    assert_rejected(answer, log, f"server 127.0.0.1:{port} is not trusted: the CRL of CN=Test Issuing CA,O=Example "
                                 f"Hospital Test PKI in {crl} expired on ")
    assert (f"so {PACS_CERTIFICATE} cannot be checked for revocation: fetch a current CRL into that file (or set "
            "[trust] crl_expired = \"warn\" to accept it meanwhile)") in log
    assert f"WARNING: the CRL of CN=Test Issuing CA,O=Example Hospital Test PKI in {crl} expired on " in log
    expired_line = next(line for line in status.splitlines() if line.startswith(f"crl {crl}: "))
    next_update = x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc
    assert expired_line == (f"crl {crl}: expired: CRL of CN=Test Issuing CA,O=Example Hospital Test PKI, next update "
                            f"{next_update:%Y-%m-%dT%H:%M:%SZ} (EXPIRED)")


def test_an_expired_crl_is_accepted_with_a_warning_when_configured(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    crl = write_crl(test_pki.pki, tmp_path / "expired.crl.pem", [], days=0)
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)],
                           **agent_settings(crl, crl_expired="warn")) as agent:
            answer, log = associate(agent, 0)
    assert_accepted(answer, log)
    assert (f"WARNING: the CRL of CN=Test Issuing CA,O=Example Hospital Test PKI in {crl} expired on ") in log
    assert "it is used meanwhile ([trust] crl_expired = \"warn\"); fetch a current CRL" in log


def test_a_bad_crl_expired_value_is_named(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], trust={"crl_expired": "ignore"})
    result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2
    assert (f"{config} [trust].crl_expired: 'ignore' is not one of 'refuse', 'warn': \"refuse\" (the default) "
            "refuses certificates an expired CRL covers, \"warn\" accepts them with a warning") in result.stderr


def test_a_crl_file_that_becomes_unusable_keeps_its_last_crls_and_is_reported(test_pki: ProvisionedPki,
                                                                              tmp_path: Path) -> None:
    crl = write_crl(test_pki.pki, tmp_path / "issuing.crl.pem", [])
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)], **agent_settings(crl)) as agent:
            assert_accepted(*associate(agent, 0))
            next_update = f"{x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc:%Y-%m-%dT%H:%M:%SZ}"
            polluted = tmp_path / "polluted.pem"
            polluted.write_bytes(crl.read_bytes() + (test_pki.pki / "untrusted-ca.pem").read_bytes())
            replace_file(crl, polluted)
            time.sleep(3)  # the agent looks at its CRL files every 2 s
            mark = len(agent.log())
            answer, log = associate(agent, mark)
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(),
                                    check=True).stdout
    assert_accepted(answer, log)
    assert (f"card-agent[session]: WARNING: CRL file {crl} holds CERTIFICATE besides CRLs: a CRL file may hold only "
            "CRLs, nothing in it is trusted (put CA certificates in [trust] ca, not in a CRL file); still using the "
            "CRLs read from it before") in log
    line = next(line for line in status.splitlines() if line.startswith(f"crl {crl}: "))
    assert line == (f"crl {crl}: UNUSABLE: CRL file {crl} holds CERTIFICATE besides CRLs: a CRL file may hold only "
                    "CRLs, nothing in it is trusted (put CA certificates in [trust] ca, not in a CRL file); still "
                    f"using CRL of CN=Test Issuing CA,O=Example Hospital Test PKI, next update {next_update}")
