"""Who may speak when: the roles of a conversation and the order of its turns, as one rule.

The annotation checker (`annotations.conversation_problems`, every problem of a record) and the
chat templates (`templates.ChatTemplate.encode`, the first problem as an error) both apply it.
"""

from __future__ import annotations

from collections.abc import Sequence

# Chat roles, in the order a conversation may use them: an optional leading system turn, then
# user and assistant turns alternating, user first.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Speakers as MedM-VL / LLaVA files write them -> chat roles.
SPEAKER_ROLES: dict[str, str] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
}
SYSTEM_FIRST = "system first"


def turn_order(roles: Sequence[str]) -> list[tuple[int, str]]:
    """(turn index, what that turn should have been) for every turn out of order: SYSTEM_FIRST
    for a system turn after the first, else the chat role expected there. After a slip the
    expectation follows the turn as written, so one slip is reported once."""
    out: list[tuple[int, str]] = []
    expected = "user"
    for i, role in enumerate(roles):
        if role == "system":
            if i != 0:
                out.append((i, SYSTEM_FIRST))
            continue
        if role != expected:
            out.append((i, expected))
        expected = "assistant" if role == "user" else "user"
    return out
