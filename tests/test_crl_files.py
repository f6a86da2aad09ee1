"""[trust] crl against a real agent: CRL files hold only CRLs, DER CRLs work, a changed CRL file
counts for the next association of the running card session, and an expired CRL is refused (or,
when configured, accepted with a warning) by file name and shown in `card-agent status`.

The PACS is `openssl s_server` with the test PKI's localhost certificate; the application sends a
real A-ASSOCIATE-RQ through the agent."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

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
from peers.pki_files import load_ca, write_crl
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
            changed = len(agent.log())
            replace_file(crl, polluted)
            time.sleep(3)  # the agent looks at its CRL files every 2 s
            answer, log = associate(agent, len(agent.log()))
            since_the_change = agent.log()[changed:]  # told once: at this association, or at a look before it
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(),
                                    check=True).stdout
    assert_accepted(answer, log)
    assert (f"card-agent[session]: WARNING: CRL file {crl} holds CERTIFICATE besides CRLs: a CRL file may hold only "
            "CRLs, nothing in it is trusted (put CA certificates in [trust] ca, not in a CRL file); still using the "
            "CRLs read from it before") in since_the_change
    line = next(line for line in status.splitlines() if line.startswith(f"crl {crl}: "))
    assert line == (f"crl {crl}: UNUSABLE: CRL file {crl} holds CERTIFICATE besides CRLs: a CRL file may hold only "
                    "CRLs, nothing in it is trusted (put CA certificates in [trust] ca, not in a CRL file); still "
                    f"using CRL of CN=Test Issuing CA,O=Example Hospital Test PKI, next update {next_update}")


# -- a CRL file that is no regular file, missing, or too large -----------------------------------------

CRL_OF_THE_ISSUER = "CRL of CN=Test Issuing CA,O=Example Hospital Test PKI"


def release_fifo_readers(fifo: Path) -> None:
    """Open ``fifo`` for writing and close it, so that a reader blocked on it (the agent before
    the fix) reads end of file and the test can stop it; nothing to do when no reader waits."""
    for _ in range(20):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: no reader (any more); ENOENT: no FIFO there
            return
        time.sleep(0.1)


def test_a_crl_file_replaced_by_a_fifo_holds_up_no_association_and_is_reported(test_pki: ProvisionedPki,
                                                                                tmp_path: Path) -> None:
    """The CRL file becomes a FIFO nobody writes to. Both tunnels' next associations pass at once
    with the CRLs read before, the log names the file and why it is not used, `card-agent status`
    shows it. Before, the card session opened the FIFO to read it, under the CRL files' lock, and
    every association on every tunnel waited for a writer, with no log line; `status` failed
    ("[trust].crl: file ... does not exist")."""
    crl = write_crl(test_pki.pki, tmp_path / "issuing.crl.pem", [])
    next_update = f"{x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc:%Y-%m-%dT%H:%M:%SZ}"
    with s_server(test_pki, tmp_path) as (port, _):
        tunnels = [tunnel("pacs", port), tunnel("other", port)]
        with running_agent(test_pki, tmp_path / "agent", tunnels, **agent_settings(crl)) as agent:
            assert_accepted(*associate(agent, 0))
            changed = len(agent.log())
            crl.unlink()
            os.mkfifo(crl)
            try:
                time.sleep(3)  # the agent looks at its CRL files every 2 s
                mark = len(agent.log())
                answers, seconds = [], []
                for name in ("pacs", "other"):
                    started = time.monotonic()
                    answers.append(send_and_close(agent.port(name), associate_rq()))
                    seconds.append(time.monotonic() - started)
                wait_for(lambda: "tunnel other: uid" in agent.log()[mark:])
                log = agent.log()[mark:]
                since_the_change = agent.log()[changed:]  # told once: at an association, or at a look before
                status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            finally:
                release_fifo_readers(crl)
    for answer in answers:
        assert_accepted(answer, log)
    assert max(seconds) < 2.0, seconds
    unusable = f"CRL file {crl} is a FIFO, not a regular file: give a file holding CRLs"
    assert f"card-agent[session]: WARNING: {unusable}; still using the CRLs read from it before" in since_the_change
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith(f"crl {crl}: "))
    assert line == f"crl {crl}: UNUSABLE: {unusable}; still using {CRL_OF_THE_ISSUER}, next update {next_update}"


def test_status_and_a_reload_go_on_while_a_crl_file_is_missing(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The CRL file is gone (a fetcher between unlink and rename): `card-agent status` still
    answers, showing the file unusable and the CRLs kept; a SIGHUP reloads, saying the file's last
    good CRLs stay in use; associations go on with them. Before, `status` and the reload both
    failed on "[trust].crl: file ... does not exist" (exit 2; "configuration not reloaded")."""
    import signal

    crl = write_crl(test_pki.pki, tmp_path / "issuing.crl.pem", [])
    next_update = f"{x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc:%Y-%m-%dT%H:%M:%SZ}"
    config = tmp_path / "agent" / "agent.toml"
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)], **agent_settings(crl)) as agent:
            assert_accepted(*associate(agent, 0))
            crl.unlink()
            time.sleep(3)  # the agent looks at its CRL files every 2 s
            status = run_card_agent("status", "--config", config, env=test_pki.env())
            mark = len(agent.log())
            agent.process.send_signal(signal.SIGHUP)
            reloaded = agent.wait_for_log("SIGHUP: configuration ", timeout=10)[mark:]  # reloaded, or not
            answer, log = associate(agent, len(agent.log()))
    missing = f"cannot read CRL file {crl}: No such file or directory"
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith(f"crl {crl}: "))
    assert line == f"crl {crl}: UNUSABLE: {missing}; still using {CRL_OF_THE_ISSUER}, next update {next_update}"
    assert f"card-agent: INFO: SIGHUP: configuration {config} reloaded: nothing changed" in reloaded, reloaded
    assert (f"card-agent: WARNING: SIGHUP: {config} [trust].crl: {missing}; still using the CRLs read from it "
            "before") in reloaded, reloaded
    assert_accepted(answer, log)


def test_the_agent_does_not_start_with_a_crl_file_that_is_missing_or_no_regular_file(test_pki: ProvisionedPki,
                                                                                      tmp_path: Path) -> None:
    """At start every CRL file must be readable, as before; the error says what is wrong with it.
    Before, a FIFO was reported as "file ... does not exist"."""
    missing, fifo = tmp_path / "missing.crl.pem", tmp_path / "fifo.crl.pem"
    os.mkfifo(fifo)
    results = {}
    for crl in (missing, fifo):
        (tmp_path / crl.stem).mkdir()
        config = write_config(tmp_path / crl.stem / "agent.toml", test_pki, [tunnel("pacs", 104)],
                              **agent_settings(crl))
        results[crl] = (config, run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN)))
    for crl, why in ((missing, f"cannot read CRL file {missing}: No such file or directory"),
                     (fifo, f"CRL file {fifo} is a FIFO, not a regular file: give a file holding CRLs")):
        config, result = results[crl]
        assert result.returncode == 2, result.stderr
        assert f"card-agent: error: {config} [trust].crl: {why}" in result.stderr, result.stderr


def judge_crl_file_alone(test_pki: ProvisionedPki, path: Path) -> tuple[str, list[str]]:
    """The PACS's verdict by the card session's checker with ``path`` as the only CRL file
    ("revoked", or the outcome), and why the file is not usable (the store's own report)."""
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates
    from dicom_card_agent.trust.crls import CrlStore

    store = CrlStore([path], interval=0)
    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle", crls=store,
                                cache_directory=None, refresh=False)
    pacs = x509.load_pem_x509_certificate((test_pki.pki / "server-chain.pem").read_bytes())
    verdict = checker.check(pacs, "require")
    return "revoked" if verdict.revoked else verdict.outcome, store.current()[1]


def test_a_crl_file_linked_to_dev_zero_is_refused_without_reading_it(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    """A symbolic link to /dev/zero as the CRL file, judged by the card session's checker in a
    process limited to 1 GB of address space: refused at once as a character device. Before, the
    checker read /dev/zero until the process ran out of memory (MemoryError here)."""
    import subprocess
    import sys

    link = tmp_path / "issuing.crl.pem"
    link.symlink_to("/dev/zero")
    script = ("import resource, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
              "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30));"
              "from conftest import ProvisionedPki; from test_crl_files import judge_crl_file_alone;"
              "print(judge_crl_file_alone(ProvisionedPki(Path(sys.argv[2]), Path(sys.argv[3])), Path(sys.argv[4])))")
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(test_pki.directory),
                             str(test_pki.softhsm_conf), str(link)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    why = f"CRL file {link} is a character device, not a regular file: give a file holding CRLs"
    assert result.stdout.strip() == repr(("refuse", [why])), result.stdout


def test_a_crl_file_larger_than_the_cap_is_refused_without_reading_it(test_pki: ProvisionedPki,
                                                                       tmp_path: Path) -> None:
    """A (sparse) file one byte over 16 MiB, the most a source's answer may hold too: refused by
    its size, naming it. Before, all of it was read and parsed."""
    big = tmp_path / "big.crl"
    with big.open("wb") as handle:
        handle.truncate(16 * 1024 * 1024 + 1)
    outcome, unusable = judge_crl_file_alone(test_pki, big)
    assert (outcome, unusable) == ("refuse", [
        f"CRL file {big} is larger than 16777216 bytes, the most a CRL file may hold (a CRL of even a big PKI is a few "
        "MB): give the CA's CRL, not another file"])


def test_a_symbolic_link_to_a_crl_file_is_read(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """As a package's alternatives or a fetcher's "current" link: the file it points to is the CRL."""
    crl = write_crl(test_pki.pki, tmp_path / "issuing-2026.crl.pem", [test_pki.pki / "server-chain.pem"])
    link = tmp_path / "issuing.crl.pem"
    link.symlink_to(crl.name)
    assert judge_crl_file_alone(test_pki, link) == ("revoked", [])


# -- delta and partitioned CRLs -------------------------------------------------------------------------

def issuing_crl(test_pki: ProvisionedPki, listed: list[x509.Certificate], *, number: int,
                scope: x509.ExtensionType | None = None, age: datetime.timedelta = datetime.timedelta(minutes=5),
                encoding: serialization.Encoding = serialization.Encoding.PEM) -> bytes:
    """A CRL of the test PKI's real issuing CA listing ``listed`` (keyCompromise), with CRLNumber
    ``number``, issued ``age`` ago, valid for a week from now, and ``scope`` (a DeltaCRLIndicator
    or IssuingDistributionPoint), critical."""
    issuing = load_ca(test_pki.pki)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuing.certificate.subject)
               .last_update(now - age).next_update(now + datetime.timedelta(days=7))
               .add_extension(x509.CRLNumber(number), critical=False))
    if scope is not None:
        builder = builder.add_extension(scope, critical=True)
    for certificate in listed:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(certificate.serial_number)
            .revocation_date(now - datetime.timedelta(hours=1))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
    return builder.sign(issuing.key, hashes.SHA256()).public_bytes(encoding)


def partition(*, reasons: frozenset[x509.ReasonFlags] | None = None, indirect: bool = False) -> x509.ExtensionType:
    return x509.IssuingDistributionPoint(full_name=None, relative_name=None, only_contains_user_certs=False,
                                         only_contains_ca_certs=False, only_some_reasons=reasons,
                                         indirect_crl=indirect, only_contains_attribute_certs=False)


PARTIAL_CRLS = {
    "delta": x509.DeltaCRLIndicator(1),
    "keyCompromise partition": partition(reasons=frozenset([x509.ReasonFlags.key_compromise])),
}


@pytest.mark.parametrize("kind", PARTIAL_CRLS)
def test_a_partial_crl_listing_the_pacs_refuses_it_but_never_vouches_for_it(test_pki: ProvisionedPki,
                                                                            tmp_path: Path, kind: str) -> None:
    """[trust] crl: the CA's complete CRL (#1, not listing the PACS) and a CA-signed delta CRL (#2
    on base 1), or a CRL of the keyCompromise partition, that lists it. The card session's checker
    and the CLI's chain check (`identities`, `doctor`) both refuse it as revoked, naming the file.
    The partial CRL alone, listing nothing, is no proof of "good". Before, a delta or partitioned
    CRL was skipped altogether, so its listing was ignored and the PACS passed."""
    from dicom_card_agent.trust.anchors import load_certificates
    from dicom_card_agent.trust.crls import check_chain, issuer_chain, read_crl_file
    from dicom_card_agent.trust.errors import RevokedCertificateError

    pacs = x509.load_pem_x509_certificate((test_pki.pki / "server-chain.pem").read_bytes())
    complete, partial, empty_partial = tmp_path / "complete.crl.pem", tmp_path / "partial.crl.pem", \
        tmp_path / "empty-partial.crl.pem"
    complete.write_bytes(issuing_crl(test_pki, [], number=1))
    partial.write_bytes(issuing_crl(test_pki, [pacs], number=2, scope=PARTIAL_CRLS[kind]))
    empty_partial.write_bytes(issuing_crl(test_pki, [], number=3, scope=PARTIAL_CRLS[kind]))

    assert judge_crl_files(test_pki, [complete]) == "allow"
    assert judge_crl_files(test_pki, [complete, partial]) == (
        f"revoked: certificate {PACS_CERTIFICATE} was revoked on "), "the partial CRL's listing was ignored"
    assert judge_crl_files(test_pki, [empty_partial]) == "refuse"  # no complete CRL: nothing proves "good"

    chain = issuer_chain(pacs, load_certificates(test_pki.ca_bundle))
    crls = [crl for path in (complete, partial) for crl in read_crl_file(path)]
    with pytest.raises(RevokedCertificateError, match=f"according to CRL file {partial}$"):
        check_chain(chain, crls, datetime.datetime.now(datetime.timezone.utc))


def test_an_indirect_crl_listing_the_serial_is_not_about_the_pacs(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """An indirect CRL's entries may be another issuer's certificates with the same serial: its
    listing does not revoke the PACS, and the complete CRL still vouches for it."""
    pacs = x509.load_pem_x509_certificate((test_pki.pki / "server-chain.pem").read_bytes())
    complete, indirect = tmp_path / "complete.crl.pem", tmp_path / "indirect.crl.pem"
    complete.write_bytes(issuing_crl(test_pki, [], number=1))
    indirect.write_bytes(issuing_crl(test_pki, [pacs], number=2, scope=partition(indirect=True)))
    assert judge_crl_files(test_pki, [complete, indirect]) == "allow"


def judge_crl_files(test_pki: ProvisionedPki, paths: list[Path]) -> str:
    """The card session's checker on the test PKI's PACS certificate with ``paths`` as [trust] crl:
    "allow", "refuse", or "revoked: " and the start of the message, up to the date."""
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates
    from dicom_card_agent.trust.crls import CrlStore

    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                crls=CrlStore(paths, interval=0), cache_directory=None, refresh=False)
    pacs = x509.load_pem_x509_certificate((test_pki.pki / "server-chain.pem").read_bytes())
    verdict = checker.check(pacs, "require")
    if not verdict.revoked:
        return verdict.outcome
    assert verdict.message.endswith(f"(reason: keyCompromise) according to CRL file {paths[-1]}"), verdict.message
    return "revoked: " + verdict.message.split(" on ")[0] + " on "
