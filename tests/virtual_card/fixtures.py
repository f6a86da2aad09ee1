"""pytest fixtures for the virtual CAC stack; import them into a test module:

    from virtual_card.fixtures import card_reader, pcscd, virtual_cards  # noqa: F401

``pcscd`` (session): a pcscd with the vpcd reader (started here if none runs, stopped at the end).
``virtual_cards`` (session): two cards, "carol" and "dave", keys in their NSS dbs, certificates
from the test PKI's issuing CA. ``card_reader`` (per test): the empty reader; every card a test
inserted is pulled again at the end, pass or fail.
When the stack cannot run, every test using them is skipped with the exact reason; in CI
(``CI`` set) it fails with it instead, since a stack CI should have and lacks is a broken CI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from conftest import ProvisionedPki
from virtual_card.nssdb import CardContents, make_card
from virtual_card.pcscd import (
    Pcscd,
    PrivatePcscd,
    StackUnavailable,
    check_installed,
    pcscd_with_vpcd,
    private_pcscd_with_two_readers,
)
from virtual_card.reader import VirtualReader

CARDS = {"carol": "Carol Example", "dave": "Dave Example"}


def stack_unavailable(error: StackUnavailable) -> NoReturn:
    """Skip the test, or in CI fail it: CI installs the whole stack (scripts/setup) and runs as root."""
    message = f"virtual smart-card stack unavailable: {error}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    with contextlib.ExitStack() as stack:
        try:
            daemon = stack.enter_context(pcscd_with_vpcd(tmp_path_factory.mktemp("pcscd")))
        except StackUnavailable as error:
            stack_unavailable(error)
        yield daemon  # the ExitStack stops a pcscd started here, whatever the tests did


@pytest.fixture(scope="session")
def virtual_cards(test_pki: ProvisionedPki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CardContents]:
    try:
        check_installed()
    except StackUnavailable as error:
        stack_unavailable(error)
    base = tmp_path_factory.mktemp("virtual-cards")
    return {nickname: make_card(test_pki.pki, base / nickname, nickname, common_name)
            for nickname, common_name in CARDS.items()}


@pytest.fixture
def card_reader(pcscd: Pcscd, tmp_path: Path) -> Iterator[VirtualReader]:
    reader = VirtualReader(tmp_path / "reader")
    try:
        reader.check_empty()
    except StackUnavailable as error:
        stack_unavailable(error)
    try:
        yield reader
    finally:
        reader.close()


@contextlib.contextmanager
def private_two_readers(workdir: Path) -> Iterator[tuple[PrivatePcscd, int]]:
    """:func:`private_pcscd_with_two_readers` for a test: skipped (in CI: failed) when the stack
    cannot run."""
    with contextlib.ExitStack() as stack:
        try:
            started = stack.enter_context(private_pcscd_with_two_readers(workdir))
        except StackUnavailable as error:
            stack_unavailable(error)
        yield started
