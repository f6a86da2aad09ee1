"""A tunnel's rules for the associations it relays, as its configuration gives them
(``allowed_calling_ae_titles``, ``user_identity`` ...). Kept apart from the association's state
machine (agent/dicom/association.py), which the configuration does not need: `card-agent status`
reads the configuration and relays nothing."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class UserIdentityMode(str, Enum):
    """``user_identity`` of a tunnel."""

    OFF = "off"
    USERNAME = "username"


class ExistingUserIdentity(str, Enum):
    """What to do when the application's A-ASSOCIATE-RQ already carries a User Identity sub-item."""

    KEEP = "keep"
    REPLACE = "replace"
    REJECT = "reject"


@dataclass(frozen=True)
class AssociationRules:
    """A tunnel's rules for associations. Empty AE title lists allow any title; entries may use
    shell wildcards (``MODALITY_*``)."""

    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_called_ae_titles: tuple[str, ...] = ()
    user_identity: UserIdentityMode = UserIdentityMode.OFF
    username_template: str = "{cn}"
    positive_response_requested: bool = False
    existing_user_identity: ExistingUserIdentity = ExistingUserIdentity.KEEP

    @property
    def can_refuse(self) -> bool:
        """True if some well-formed A-ASSOCIATE-RQ would be refused under these rules. A request
        with AE titles PS3.5 forbids is refused under any rules; without these, only after the
        agent has connected to the PACS (the request itself never reaches it)."""
        return bool(self.allowed_calling_ae_titles or self.allowed_called_ae_titles or (
            self.user_identity is not UserIdentityMode.OFF
            and self.existing_user_identity is ExistingUserIdentity.REJECT))
