"""Shared tasks (``@heddle.task``) in a module with no app of its own: an app includes them."""

import heddle


@heddle.task
def shout(text: str) -> str:
    return text.upper()


@heddle.task(name="shared.whisper")
def whisper(text: str) -> str:
    return text.lower()
