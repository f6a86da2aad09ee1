#!/usr/bin/env python3
"""What a card-session handshake costs that no code of the agent decides: the token's signature and
the pkcs11-provider loaded next to OpenSSL's default provider (a diagnostic for docs/benchmarks.md;
not part of the test suite).

    .venv/bin/python benchmarks/handshake_costs.py [--samples 200] [--rounds 3]

A DICOM application doing TLS itself signs with a key in memory, in a process whose OpenSSL has only
the default provider. The card-session process signs on the token, and its OpenSSL also has the
pkcs11-provider, which OpenSSL 3.0 then consults when it decodes certificates and keys. Measured in
one run, each client in a process of its own, rounds interleaved, against one local TLS server
(its own process, OpenSSL defaults, client certificate required):

- client with OpenSSL's default configuration ("default") and with the card session's configuration
  for SoftHSM (``agent.tls.provider.openssl_config`` with the softhsm2 profile's quirks, "agent"),
  both offering the agent's groups:
  attaching a session to resume (Python's ssl copies it through DER), a resumed handshake, a full
  handshake with the same RSA-2048 file key;
- in the agent configuration only: a full handshake signing on the token (SoftHSM ``alice``, RSA-2048,
  through the provider), as the card session does;
- SoftHSM's ``C_Sign`` alone (python-pkcs11, SHA256-RSA-PKCS, same token), for scale.

It prints medians over all samples in ms, and ratios agent / default.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: provisioning, test PKI files, OpenSSL config)
from dicom_card_agent.tls.policy import TLS_GROUPS  # noqa: E402
from dicom_card_agent.tls.provider import openssl_config, provider_key_pem  # noqa: E402
from dicom_card_agent.token.profiles import get_profile  # noqa: E402

TOKEN_KEY_URI = bench.token_key_uri(bench.TOKEN)


def serve(pki: Path) -> None:
    """The TLS server: prints its port, then answers one byte per connection until killed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server-chain.pem", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki / "ca-bundle.pem")
    listener = socket.create_server((bench.LOOPBACK, 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        connection, _ = listener.accept()
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                if tls.recv(1):
                    tls.sendall(b"k")
        except (OSError, ssl.SSLError):
            connection.close()


def _client_context(pki: Path, chain: Path, key: Path, password: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki / "ca-bundle.pem")
    context.load_cert_chain(chain, key, password=password)
    return context


def _handshake_ms(context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None,
                  ) -> tuple[float, ssl.SSLSession | None, bool]:
    raw = socket.create_connection((bench.LOOPBACK, port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.perf_counter()
    tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
    elapsed = (time.perf_counter() - started) * 1000
    tls.sendall(b"x")  # the server answers once it has checked our certificate: then the session is final
    tls.recv(1)
    reused, session = tls.session_reused, tls.session
    tls.close()
    return elapsed, session, reused


ITEMS = ("creating the TLS object", "attaching a session to resume", "resumed handshake", "full handshake")


def _context_samples(context: ssl.SSLContext, port: int, samples: int) -> dict[str, list[float]]:
    full = [_handshake_ms(context, port) for _ in range(samples)]
    session = full[-1][1]
    resumed = [_handshake_ms(context, port, session) for _ in range(samples)]
    if not all(reused for _, _, reused in resumed):
        raise SystemExit("the server did not resume every session")
    create, attach = [], []
    for _ in range(samples):
        started = time.perf_counter()
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
        created = time.perf_counter()
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost", session=session)
        create.append((created - started) * 1000)
        attach.append((time.perf_counter() - created - (created - started)) * 1000)
    return {"creating the TLS object": create, "attaching a session to resume": attach,
            "resumed handshake": [ms for ms, _, _ in resumed], "full handshake": [ms for ms, _, _ in full]}


def measure(pki: Path, port: int, samples: int, file_chain: Path, file_key: Path, token_chain: Path | None,
            token_key: Path | None) -> dict[str, dict[str, list[float]]]:
    """One client process's samples (ms) per key ("file key", "token key") and item."""
    contexts = {"file key": _client_context(pki, file_chain, file_key)}
    # Every key is loaded before the first handshake, as the card session does: a token key loaded
    # into a process that has already done handshakes (OpenSSL 3.0.19, pkcs11-provider 1.0,
    # SoftHSM) made later server certificates fail to verify ("certificate signature failure").
    if token_key is not None and token_chain is not None:
        contexts["token key"] = _client_context(pki, token_chain, token_key, password=bench.USER_PIN)
    return {key: _context_samples(context, port, samples) for key, context in contexts.items()}


def softhsm_sign(samples: int) -> list[float]:
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass
    token = pkcs11.lib(bench.SOFTHSM_MODULE).get_token(token_label=bench.TOKEN)
    with token.open(user_pin=bench.USER_PIN) as session:
        key = next(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: b"\x01"}))
        timings = []
        for _ in range(samples):
            started = time.perf_counter()
            key.sign(b"\x00" * 32, mechanism=Mechanism.SHA256_RSA_PKCS)
            timings.append((time.perf_counter() - started) * 1000)
        return timings


def _child(mode: str, work: Path, env: dict[str, str], *args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), *args], env=env,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise bench.BenchError(f"{mode} client failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(args.work)
        pki = work / "tokens" / "pki"
        if args.child == "serve":
            serve(pki)
        elif args.child == "sign":
            print(json.dumps({"SoftHSM C_Sign alone": softhsm_sign(args.samples)}))
        else:
            token = args.child == "agent"
            print(json.dumps(measure(pki, args.port, args.samples, work / "file" / "chain.pem",
                                     work / "file" / "key.pem", work / "token-chain.pem" if token else None,
                                     work / "token-key.pem" if token else None)), flush=True)
            # SoftHSM, finalized by OpenSSL's exit handlers while python-pkcs11 or the provider still
            # hold it, may crash the process on exit; the results are out by then.
            os._exit(0)
        return 0

    base_env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "SOFTHSM2_CONF", "CARD_AGENT_MODULE")}
    work = Path(tempfile.mkdtemp(prefix="card-agent-handshake-",
                                 dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    server = None
    try:
        subprocess.run([bench.card_agent_executable(), "softhsm", "init", str(work / "tokens")], check=True,
                       capture_output=True, text=True, env=base_env, stdin=subprocess.DEVNULL)
        pki, softhsm_conf = work / "tokens" / "pki", work / "tokens" / "softhsm2.conf"
        file_identity = bench.TlsClientFiles.issue(pki, work / "file-identity", "Handshake Costs", key_type="rsa")
        (work / "file").mkdir()
        shutil.copy(file_identity.chain, work / "file" / "chain.pem")
        shutil.copy(file_identity.key, work / "file" / "key.pem")
        bench.write_token_chain(pki, bench.TOKEN, work / "token-chain.pem")
        (work / "token-key.pem").write_bytes(provider_key_pem(TOKEN_KEY_URI))
        configs = {"default": work / "default.cnf", "agent": work / "agent.cnf"}
        configs["default"].write_text(bench._BENCH_OPENSSL_CONF.format(groups=TLS_GROUPS))
        softhsm = get_profile("softhsm2")  # its provider quirks, as the card session gets them
        configs["agent"].write_text(openssl_config(bench.SOFTHSM_MODULE, softhsm.provider_quirks,
                                                   softhsm.provider_login_behavior, tls_groups=TLS_GROUPS))

        server = subprocess.Popen([sys.executable, __file__, "--child", "serve", "--work", str(work)], env=base_env,
                                  stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        port = int(server.stdout.readline())
        columns = (("default", "file key"), ("agent", "file key"), ("agent", "token key"))
        samples: dict[tuple[str, str], dict[str, list[float]]] = {column: {} for column in columns}
        for round_number in range(args.rounds):
            for name in ("default", "agent") if round_number % 2 == 0 else ("agent", "default"):
                env = {**base_env, "OPENSSL_CONF": str(configs[name]), "SOFTHSM2_CONF": str(softhsm_conf)}
                bench.say(f"round {round_number + 1}/{args.rounds}: {name} configuration")
                for key, items in _child(name, work, env, "--port", str(port), "--samples",
                                         str(args.samples)).items():
                    for item, values in items.items():
                        samples[(name, key)].setdefault(item, []).extend(values)
        signatures = _child("sign", work, {**base_env, "SOFTHSM2_CONF": str(softhsm_conf)}, "--samples",
                            str(args.samples))["SoftHSM C_Sign alone"]

        print(f"#### Handshake costs outside the agent's code ({args.rounds} rounds x {args.samples} samples, "
              f"medians in ms)\n")
        print(f"Command: `.venv/bin/python benchmarks/handshake_costs.py --samples {args.samples} "
              f"--rounds {args.rounds}`; {ssl.OPENSSL_VERSION}.\n")
        print("| item | A: default configuration, file key (an application) | B: agent configuration, file key "
              "| C: agent configuration, token key (the card session) | B / A | C / A |")
        print("|---|---:|---:|---:|---:|---:|")
        for item in ITEMS:
            a, b, c = (statistics.median(samples[column][item]) for column in columns)
            print(f"| {item} | {a:.3f} | {b:.3f} | {c:.3f} | {b / a:.2f}x | {c / a:.2f}x |")
        print("\nSoftHSM C_Sign alone (SHA256-RSA-PKCS, RSA-2048, python-pkcs11): "
              f"{statistics.median(signatures):.3f} ms.")
        return 0
    except bench.BenchError as error:
        bench.say(f"failed: {error}")
        return 1
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
