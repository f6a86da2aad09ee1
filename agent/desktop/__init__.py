"""What the clinician sees on the desktop: the PIN dialog's words, which pinentry shows it, and
desktop notifications (docs/clinician-guide.md)."""
