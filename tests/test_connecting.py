"""Reaching a PACS: agent/tunnel/resolver.py against glibc's real stub resolver and a DNS server of
the test's own (peers/dns.py), in a process of its own since the resolver is pointed at that server
through a mount namespace; and the order agent/tunnel/connecting.py tries addresses in. The races
between addresses are tested on the agent (test_tunnel_agent.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dicom_card_agent.tunnel.connecting import _families_alternating
from peers.dns import DnsServer, resolving_through

NAME = "pacs.card-agent.test"

# Five lookups of one name at once, while the DNS server is silent; the fourth stops waiting when
# its given_up future completes, the others at their timeout. Prints what each got, and when.
LOOKUPS = textwrap.dedent(f"""
    import concurrent.futures, json, threading, time
    from dicom_card_agent.tunnel.resolver import resolve_stream
    given_up = [concurrent.futures.Future() for _ in range(5)]
    results = [None] * 5
    def look_up(index):
        started = time.monotonic()
        try:
            resolve_stream({NAME!r}, 104, 1.5, given_up[index])
            outcome = "answered"
        except Exception as error:
            outcome = type(error).__name__ + ": " + str(error)
        results[index] = [outcome, round(time.monotonic() - started, 2)]
    threads = [threading.Thread(target=look_up, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    given_up[3].set_result("locked")
    for thread in threads:
        thread.join()
    print(json.dumps(results))
""")


def test_lookups_of_one_name_at_once_share_one_dns_question_and_each_stops_waiting_on_its_own(
        tmp_path: Path) -> None:
    """During a DNS outage each association waiting for the PACS's name must not hold a thread (and
    send a query) of its own: five waiting at once ask once. Each still stops waiting at its own
    deadline, or at once when its card session ends."""
    with DnsServer({NAME: ["127.0.0.1"]}) as dns:
        dns.silent = True
        result = subprocess.run([*resolving_through(dns, tmp_path), sys.executable, "-c", LOOKUPS],
                                capture_output=True, text=True, timeout=60)
        questions = list(dns.questions)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert outcomes[3][0] == "ResolutionGivenUpError: locked" and outcomes[3][1] < 1.0, outcomes
    for outcome, seconds in outcomes[:3] + outcomes[4:]:
        assert outcome == f"ResolverTimeoutError: no DNS answer for {NAME} within 1.5 s", outcomes
        assert 1.4 < seconds < 2.5, outcomes
    assert questions.count((NAME, "A")) == 1, questions  # glibc asks again only after its 5 s timeout


def test_a_name_that_answers_is_asked_again_by_the_next_lookup(tmp_path: Path) -> None:
    """Nothing is kept once a lookup is done: a PACS moved to a new address is found by the next
    association."""
    program = textwrap.dedent(f"""
        import concurrent.futures
        from dicom_card_agent.tunnel.resolver import resolve_stream
        for _ in range(2):
            print(resolve_stream({NAME!r}, 104, 5, concurrent.futures.Future())[0][4])
    """)
    with DnsServer({NAME: ["127.0.0.9"]}, delay=0.1) as dns:
        result = subprocess.run([*resolving_through(dns, tmp_path), sys.executable, "-c", program],
                                capture_output=True, text=True, timeout=60)
        questions = list(dns.questions)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["('127.0.0.9', 104)"] * 2
    assert questions.count((NAME, "A")) == 2, questions


@given(st.lists(st.sampled_from([socket.AF_INET6, socket.AF_INET]), max_size=12))
def test_addresses_alternate_families_from_the_resolvers_first_choice_in_its_order(families: list[int]) -> None:
    """RFC 8305 section 4: every address once; each family in the resolver's order; the families
    alternate, starting with the resolver's first choice, until one runs out."""
    addresses = [(family, socket.SOCK_STREAM, 6, "", (str(index), 104)) for index, family in enumerate(families)]
    ordered = _families_alternating(addresses)
    assert sorted(ordered, key=lambda a: int(a[4][0])) == addresses
    for family in set(families):
        assert [a for a in ordered if a[0] == family] == [a for a in addresses if a[0] == family]
    if ordered:
        assert ordered[0][0] == families[0]
        mixed = 2 * min(families.count(socket.AF_INET), families.count(socket.AF_INET6))
        assert all(ordered[i][0] != ordered[i + 1][0] for i in range(mixed - 1))
