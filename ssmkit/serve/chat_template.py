"""A checkpoint's chat template (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``, as
transformers saves them), compiled in Jinja2's immutable sandbox and rendered as transformers'
``apply_chat_template(..., add_generation_prompt=True)`` renders it. See :mod:`ssmkit.serve.chat` for the route."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from ssmkit.serve.schemas import clip

log = logging.getLogger("ssmkit.serve")

MAX_TEMPLATE_BYTES = 1 << 20


class ChatTemplate:
    """A compiled chat template and the special-token strings it may use."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages`` with the assistant's turn opened. Raises ValueError for a template error."""
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except (TemplateError, SecurityError) as e:
            raise ValueError(str(e) or type(e).__name__) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
            raise ValueError(f"the chat template failed on these messages ({type(e).__name__})") from None


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_chat_template(folder: Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None if it has none (a broken one is logged and ignored)."""
    config: dict[str, Any] = {}
    path = folder / "tokenizer_config.json"
    source = None
    try:
        if path.is_file() and path.stat().st_size <= 16 * MAX_TEMPLATE_BYTES:
            loaded = json.loads(path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        jinja = folder / "chat_template.jinja"
        if jinja.is_file() and jinja.stat().st_size <= MAX_TEMPLATE_BYTES:
            source = jinja.read_text()
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("chat template: %s cannot be read (%s); /v1/chat/completions is off", path.name, type(e).__name__)
        return None
    if source is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        source = template if isinstance(template, str) and len(template) <= MAX_TEMPLATE_BYTES else None
    if source is None:
        return None
    try:
        return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
    except Exception as e:  # noqa: BLE001 (a template that does not compile: serve without chat)
        log.warning("chat template does not compile (%s); /v1/chat/completions is off", clip(str(e), 200))
        return None
