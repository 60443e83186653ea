"""Ollama Modelfiles whose TEMPLATE formats a conversation exactly as the base's chat template does.

The Go template is derived, not looked up: the chat template is rendered on conversations with
marker contents, and the text around the markers gives each role's prefix and suffix. The parts
are checked by rebuilding the rendered strings from them, so a template that is not of the
"prefix + content + suffix per message" kind is refused instead of silently mistranslated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pastiche import chat
from pastiche.errors import PasticheError

SYSTEM, USER1, ANSWER, USER2 = "\x01sys\x01", "\x01user one\x01", "\x01answer\x01", "\x01user two\x01"


@dataclass
class TemplateParts:
    system_prefix: str
    system_suffix: str
    default_system: str  # what the template writes when no system message is given
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str  # the assistant opening added for the reply


NOT_EXPRESSIBLE = ("the run's chat template (tokenizer/) cannot be expressed as an Ollama TEMPLATE "
                   "(its turns are not a fixed prefix and suffix around each message's content).")


def _between(text: str, start: str | None, end: str | None) -> str:
    if (start is not None and start not in text) or (end is not None and end not in text):
        raise PasticheError(NOT_EXPRESSIBLE)
    if start is not None:
        text = text.split(start, 1)[1]
    return text.split(end, 1)[0] if end is not None else text


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
        raise PasticheError(NOT_EXPRESSIBLE)
    return text[len(prefix): len(text) - len(suffix)]


def template_parts(tokenizer) -> TemplateParts:
    chat.ensure_template(tokenizer)
    user, answer = {"role": "user", "content": USER1}, {"role": "assistant", "content": ANSWER}

    def render(messages, generation=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    one_turn = render([user])
    user_suffix = _between(one_turn, USER1, None)
    generation = _strip(render([user], True), one_turn)
    answered = render([user, answer])
    assistant_suffix = _between(answered, ANSWER, None)
    assistant_prefix = _strip(_between(answered, USER1, ANSWER), user_suffix)
    full = render([{"role": "system", "content": SYSTEM}, user, answer, {"role": "user", "content": USER2}], True)
    user_prefix = _strip(_between(full, ANSWER, USER2), assistant_suffix)
    parts = TemplateParts(
        system_prefix=_between(full, None, SYSTEM),
        system_suffix=_strip(_between(full, SYSTEM, USER1), "", user_prefix),
        default_system=_strip(_between(one_turn, None, USER1), "", user_prefix),
        user_prefix=user_prefix, user_suffix=user_suffix, assistant_prefix=assistant_prefix,
        assistant_suffix=assistant_suffix, generation=generation)
    rebuilt = (parts.system_prefix + SYSTEM + parts.system_suffix + parts.user_prefix + USER1 + user_suffix
               + assistant_prefix + ANSWER + assistant_suffix + user_prefix + USER2 + user_suffix + generation)
    if rebuilt != full:
        raise PasticheError(NOT_EXPRESSIBLE)
    return parts


def go_template(parts: TemplateParts) -> str:
    """Ollama TEMPLATE text: .System (or the template's default), then each user/assistant turn."""
    for text in dataclasses.astuple(parts):
        if "{{" in text or '"""' in text:
            raise PasticheError("the base's chat template contains '{{' or '\"\"\"', which an Ollama TEMPLATE cannot quote.")
    system = f"{{{{ if .System }}}}{parts.system_prefix}{{{{ .System }}}}{parts.system_suffix}"
    system += f"{{{{ else }}}}{parts.default_system}{{{{ end }}}}" if parts.default_system else "{{ end }}"
    turns = (f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{parts.user_prefix}{{{{ .Content }}}}{parts.user_suffix}'
             f'{{{{ else if eq .Role "assistant" }}}}{parts.assistant_prefix}{{{{ .Content }}}}{parts.assistant_suffix}'
             f"{{{{ end }}}}{{{{ end }}}}")
    return system + turns + parts.generation


def sampling_defaults() -> dict[str, float]:
    """Ollama PARAMETERs taken from `pastiche generate`'s defaults, so both sample alike."""
    from pastiche.config import GenerateConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GenerateConfig)}
    return {"temperature": defaults["temperature"], "top_p": defaults["top_p"], "top_k": defaults["top_k"],
            "repeat_penalty": defaults["repetition_penalty"]}


def modelfile_text(from_lines: list[str], template: str, stops: list[str], num_ctx: int,
                   system: str | None, source: str) -> str:
    lines = [f"# Written by `pastiche export` from {source}.", *from_lines, f'TEMPLATE """{template}"""']
    if system:
        if '"""' in system:
            raise PasticheError('the training system prompt contains \'"""\', which a Modelfile SYSTEM cannot quote.')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    lines += [f"PARAMETER {name} {value}" for name, value in sampling_defaults().items()]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def relative_from(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, spelled so Ollama reads it as a file, not a model name."""
    rel = os.path.relpath(path, folder)
    return rel if rel.startswith("../") else "./" + rel


def write_modelfiles(out: Path, final: Path, template: str, stops: list[str], base_gguf: Path, num_ctx: int,
                     system: str | None, source: str) -> None:
    """Modelfile (FROM merged) and Modelfile.adapter (FROM base + ADAPTER); paths relative to ``final``."""
    from pastiche import paths

    merged_from = [f"FROM ./{paths.MERGED_GGUF}"]
    adapter_from = [f"FROM {relative_from(base_gguf, final)}", f"ADAPTER ./{paths.ADAPTER_GGUF}"]
    for name, from_lines in ((paths.MODELFILE, merged_from), (paths.MODELFILE_ADAPTER, adapter_from)):
        text = modelfile_text(from_lines, template, stops, num_ctx, system, source)
        (out / name).write_text(text, encoding="utf-8")
