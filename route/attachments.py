"""The attachment policy: a per-attachment size limit and a list of blocked extensions.

Takes the email's attachments and ``AttachmentSettings``; gives them with a ``status``
(``stored``, ``blocked-extension``, ``too-large``) and, for a refused one, its content
dropped (its size and SHA-256 stay, so the record says what was refused), plus one note per
refusal for the email (``attachment-blocked:<name>``, ``attachment-too-large:<name>``).
Pure; never raises.
"""

from __future__ import annotations

from typing import Any

from shared.settings import AttachmentSettings


def _extension_blocked(filename: str, blocked: tuple[str, ...]) -> bool:
    name = filename.strip().rstrip(". ").lower()
    return any(name.endswith(ext.lower() if ext.startswith(".") else f".{ext.lower()}")
               for ext in blocked)


def screen_attachments(attachments: list[dict[str, Any]], policy: AttachmentSettings
                       ) -> tuple[list[dict[str, Any]], list[str]]:
    screened: list[dict[str, Any]] = []
    notes: list[str] = []
    for attachment in attachments:
        filename = str(attachment.get("filename") or "")
        status = "stored"
        if _extension_blocked(filename, policy.blocked_extensions):
            status = "blocked-extension"
            notes.append(f"attachment-blocked:{filename}")
        elif int(attachment.get("size") or 0) > policy.max_bytes:
            status = "too-large"
            notes.append(f"attachment-too-large:{filename}:{attachment.get('size')}>"
                         f"{policy.max_bytes}")
        screened.append({**attachment, "status": status,
                         **({} if status == "stored" else {"content": b""})})
    return screened, notes
