"""The checkpoint's own tokenizer, loaded offline from tokenizer.json, with its chat template (tokenizer_config.json
or chat_template.jinja) rendered as transformers renders it."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: str | None):
        self._tokenizer = tokenizer
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer | None":
        """The tokenizer saved beside a checkpoint, or None when there is no tokenizer.json."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            return None
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        template_path = directory / "chat_template.jinja"
        if template_path.is_file():
            template = template_path.read_text()
        return cls(_HFTokenizer.from_file(str(directory / "tokenizer.json")), config, template)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_continuation(self, context: list[int], ids: list[int]) -> str:
        """The text `ids` add after `context`: decoders that drop a word-initial space at the start of a sequence
        (SentencePiece) keep it when the continuation is decoded after its context."""
        head = self.decode(context)
        whole = self.decode(list(context) + list(ids))
        return whole[len(head):] if whole.startswith(head) else self.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, text: str) -> list[int]:
        """One user turn, rendered with the chat template (which writes its own special tokens)."""
        return self.encode(self.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def _raise_template_error(message: str):
    raise ValueError(f"chat template: {message}")
