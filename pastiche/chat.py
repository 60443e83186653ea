"""How a record becomes tokens: the base's chat template, or a plain one for models without.

Shared by prepare (token counts), train (labels), generate/serve (prompts) and export (the
Ollama TEMPLATE), so that every stage formats a request exactly the same way.
"""

from __future__ import annotations

PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Request:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def messages_for(prompt: str, system: str | None = None, completion: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


def ensure_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the plain one (and a pad token if missing)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The text the model continues: every message, then the assistant's opening."""
    ensure_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn in this template (e.g. '<|im_end|>' or EOS)."""
    ensure_template(tokenizer)
    probe = "\x00PROBE\x00"
    full = tokenizer.apply_chat_template(messages_for("q", completion=probe), tokenize=False)
    tail = full.split(probe, 1)[1]
    eos = tokenizer.eos_token or ""
    # Keep the end-of-turn marker, drop the newline that only separates turns.
    if eos and eos in tail:
        return tail[: tail.index(eos) + len(eos)]
    return tail.rstrip("\n") or eos


def stop_strings(tokenizer) -> list[str]:
    """Strings that end generation: the end-of-turn marker and EOS."""
    stops = [end_of_turn(tokenizer).strip()]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return [s for s in stops if s]


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for text in stop_strings(tokenizer):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_record(tokenizer, prompt: str, completion: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids); the completion ends with the end-of-turn token(s) to learn."""
    ensure_template(tokenizer)
    prompt_ids = tokenizer.encode(prompt_text(tokenizer, messages_for(prompt, system)), add_special_tokens=False)
    completion_ids = tokenizer.encode(completion + end_of_turn(tokenizer), add_special_tokens=False)
    return prompt_ids, completion_ids
