"""pytest fixtures for the virtual CAC stack; import them into a test module:

    from virtual_card.fixtures import card_reader, pcscd, virtual_cards  # noqa: F401

``pcscd`` (session): a pcscd with the vpcd reader (started here if none runs, stopped at the end).
``virtual_cards`` (session): two cards, "carol" and "dave", keys in their NSS dbs, certificates
from the test PKI's issuing CA. ``card_reader`` (per test): the empty reader; every card a test
inserted is pulled again at the end, pass or fail.
When the stack cannot run, every test using them is skipped with the exact reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ProvisionedPki
from virtual_card.nssdb import CardContents, make_card
from virtual_card.pcscd import Pcscd, StackUnavailable, check_installed, pcscd_with_vpcd
from virtual_card.reader import VirtualReader

CARDS = {"carol": "Carol Example", "dave": "Dave Example"}


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    with contextlib.ExitStack() as stack:
        try:
            daemon = stack.enter_context(pcscd_with_vpcd(tmp_path_factory.mktemp("pcscd")))
        except StackUnavailable as error:
            pytest.skip(f"virtual smart-card stack unavailable: {error}")
        yield daemon  # the ExitStack stops a pcscd started here, whatever the tests did


@pytest.fixture(scope="session")
def virtual_cards(test_pki: ProvisionedPki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CardContents]:
    try:
        check_installed()
    except StackUnavailable as error:
        pytest.skip(f"virtual smart-card stack unavailable: {error}")
    base = tmp_path_factory.mktemp("virtual-cards")
    return {nickname: make_card(test_pki.pki, base / nickname, nickname, common_name)
            for nickname, common_name in CARDS.items()}


@pytest.fixture
def card_reader(pcscd: Pcscd, tmp_path: Path) -> Iterator[VirtualReader]:
    reader = VirtualReader(tmp_path / "reader")
    try:
        reader.check_empty()
    except StackUnavailable as error:
        pytest.skip(f"virtual smart-card stack unavailable: {error}")
    try:
        yield reader
    finally:
        reader.close()
