"""What an administrator reads when the audit trail refuses associations (``[audit] on_failure =
"refuse"``): in the tunnels' log lines and in ``card-agent status``, which must not need the whole
trail to say it."""

from __future__ import annotations

RESTART_REMEDY = "restart the agent"  # ends the refusal of a trail that cannot record the reports


def refusal_advice(refusal: str) -> str:
    """What to do about ``refusal`` (:meth:`AuditTrail.refusal`), to follow it in a log line or in
    `status`: a trail that cannot be written is accepted again as soon as it can be; one that cannot
    record what the card session reports says itself that the agent must be restarted."""
    if refusal.endswith(RESTART_REMEDY):
        return ""
    return '; [audit] on_failure = "refuse": free space there, associations are accepted again as soon as the trail ' \
           "can be written"
