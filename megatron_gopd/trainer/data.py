"""Prompt data: jsonl in, tokenized prompts out, in a deterministic and resumable order.

Each line is a JSON object with ``prompt`` (text) or ``messages`` (chat, a list of
``{"role", "content"}``), an optional ``domain`` (routes the prompt to its teacher in multi-teacher
runs) and any other fields (``answer``, ``tests``, ...), which are kept as metadata and travel with
the samples. Every problem is reported with its line number before any model is built.

Order: epoch ``e`` visits the prompts in the permutation ``randperm(n, seed + e)``; the iterator's
state is ``(epoch, offset)``, saved in checkpoints so that a resumed run sees the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_gopd.flags import flag
from megatron_gopd.utils import GopdError, json_object_line, read_text_file

__all__ = ["DataConfig", "Prompt", "PromptDataset", "PromptIterator", "load_prompts"]

DEFAULT_DOMAIN = "default"


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


_json_object.__name__ = "JSON object"  # argparse's "invalid JSON object value: ..."


def _domain_list(value) -> tuple[str, ...]:
    """``--domains math,code`` / ``--domains math code`` / YAML ``[math, code]`` or ``"math,code"``
    -> ``("math", "code")``."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(d.strip() for item in items for d in str(item).split(",") if d.strip())


@dataclass(frozen=True)
class DataConfig:
    FLAG_GROUP = "data"

    prompt_data: str | None = flag(
        None,
        help="jsonl: 'prompt' or 'messages', optional 'domain', extra fields kept",
        default_help="required",
    )
    eval_prompt_data: str | None = flag(
        None, help="jsonl of fixed evaluation prompts (same format)"
    )
    apply_chat_template: bool = flag(
        False, help="wrap each prompt in the tokenizer's chat template (chat models)"
    )
    chat_template_kwargs: dict | None = flag(
        None,
        type=_json_object,
        metavar="JSON",
        help="extra chat-template variables, e.g. '{\"enable_thinking\": false}' for Qwen3 "
        "non-thinking models",
    )
    max_prompt_len: int = flag(
        1024, help="longest prompt in tokens; a longer one is an error naming its line"
    )
    domains: tuple[str, ...] = flag(
        (),
        parse=_domain_list,
        metavar="DOMAIN[,DOMAIN...]",
        default_help="every domain of the prompt data",
        help="keep only the prompts of these domains (training and evaluation prompts), e.g. "
        "--domains math,code",
    )
    tokenizer: str | None = flag(
        None,
        help="HF tokenizer directory",
        default_help="the student checkpoint's tokenizer/",
    )


@dataclass
class Prompt:
    index: int  # line order in the file (0-based, blank lines excluded)
    prompt_ids: list[int]
    domain: str = DEFAULT_DOMAIN
    metadata: dict[str, Any] = field(default_factory=dict)


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    rec = json_object_line(path, lineno, line)
    has_prompt, has_msgs = "prompt" in rec, "messages" in rec
    if has_prompt == has_msgs:
        raise GopdError(
            f"{path}:{lineno}: needs exactly one of 'prompt' (text) or 'messages' (chat)"
        )
    if has_prompt and (not isinstance(rec["prompt"], str) or not rec["prompt"].strip()):
        raise GopdError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
    if has_msgs:
        msgs = rec["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
        ):
            raise GopdError(
                f"{path}:{lineno}: 'messages' must be a non-empty list of "
                f"{{'role', 'content'}} objects"
            )
    if "domain" in rec and (not isinstance(rec["domain"], str) or not rec["domain"]):
        raise GopdError(f"{path}:{lineno}: 'domain' must be a non-empty string")
    return rec


def load_prompts(
    path: str | Path,
    tokenizer,
    *,
    apply_chat_template: bool,
    known_domains: set[str] | None = None,
    max_prompt_len: int | None = None,
    chat_template_kwargs: dict | None = None,
    keep_domains: tuple[str, ...] = (),
    require_kept_domains: bool = True,
    skipped: dict[str, int] | None = None,
) -> list[Prompt]:
    """Read and tokenize a prompt jsonl; one clear error (with the line number) per problem.

    ``known_domains``: the domains that have a teacher; ``None`` accepts any domain (single
    teacher). ``keep_domains``: when given, the lines of other domains are skipped (and not
    checked beyond being valid JSON objects), counted per domain in ``skipped``; each kept domain
    must have prompts unless ``require_kept_domains`` is False (a typo in ``--domains`` is an
    error). Prompts longer than ``max_prompt_len`` tokens are an error here, where the user can
    still fix the data, rather than a silent skip later.
    """
    path = Path(path)
    lines = read_text_file(path, "prompt data").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    out: list[Prompt] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise GopdError(f"{path}:{lineno}: empty line")
        rec = _parse_line(path, lineno, line)
        domain = rec.get("domain", DEFAULT_DOMAIN)
        seen.add(domain)
        if keep_domains and domain not in keep_domains:
            if skipped is not None:
                skipped[domain] = skipped.get(domain, 0) + 1
            continue
        if known_domains is not None and domain not in known_domains:
            raise GopdError(
                f"{path}:{lineno}: domain {domain!r} has no teacher (teachers: "
                f"{', '.join(sorted(known_domains))}); add --teacher-load {domain}=PATH"
            )
        ids = tokenize_prompt(
            rec,
            tokenizer,
            apply_chat_template=apply_chat_template,
            where=f"{path}:{lineno}",
            chat_template_kwargs=chat_template_kwargs,
        )
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            raise GopdError(
                f"{path}:{lineno}: prompt has {len(ids)} tokens, more than "
                f"--max-prompt-len {max_prompt_len}"
            )
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "messages", "domain")}
        out.append(Prompt(index=len(out), prompt_ids=ids, domain=domain, metadata=meta))
    absent = [d for d in keep_domains if d not in seen]
    if absent and (require_kept_domains or not out):
        raise GopdError(
            f"--domains names {absent[0]!r}, which no prompt of {path} has (its domains: "
            f"{', '.join(sorted(seen)) or 'none'})"
        )
    if not out:
        raise GopdError(f"prompt data {path} is empty")
    return out


def tokenize_prompt(
    rec: dict,
    tokenizer,
    *,
    apply_chat_template: bool,
    where: str = "",
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    if apply_chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise GopdError(
                f"{where}: --apply-chat-template given but the tokenizer has no chat template"
            )
        msgs = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
        ids = tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    if "messages" in rec:
        raise GopdError(f"{where}: chat 'messages' need --apply-chat-template")
    return list(tokenizer(rec["prompt"])["input_ids"])


class PromptDataset:
    def __init__(self, prompts: list[Prompt]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def domains(self) -> list[str]:
        return sorted({p.domain for p in self.prompts})


@dataclass
class PromptIterator:
    """Endless, seeded, resumable walk over a dataset: ``next(k)`` returns ``k`` prompts."""

    dataset: PromptDataset
    seed: int
    epoch: int = 0
    offset: int = 0

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def next(self, k: int) -> list[Prompt]:
        out = []
        order = self._order(self.epoch)
        while len(out) < k:
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
                order = self._order(self.epoch)
            out.append(self.dataset.prompts[order[self.offset]])
            self.offset += 1
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "size": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.dataset):
            raise GopdError(
                f"the prompt data changed since the checkpoint ({state.get('size')} prompts "
                f"then, {len(self.dataset)} now): cannot resume its order"
            )
        self.epoch, self.offset, self.seed = state["epoch"], state["offset"], state["seed"]
