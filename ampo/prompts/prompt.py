"""`Prompt`: one training or evaluation prompt, with the verifiable instructions (IFEval/IFBench ids) it carries."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The one prompt-id pattern (ampo.schema checks stored rows with it too): part of the row ids
# "{run}/{round}/{prompt_id}/{sample}", so no '/', and no quote, backslash or space (safe in store filters).
PROMPT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:+=@-]{0,127}$"


@dataclass(frozen=True)
class Prompt:
    """A prompt; `kwargs[i]` parameterises the checker of `instruction_id_list[i]` (IFEval's data layout)."""

    prompt_id: str
    prompt: str
    instruction_id_list: list[str] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_id, str) or not re.fullmatch(PROMPT_ID_PATTERN, self.prompt_id):
            raise ValueError(
                f"prompt id {self.prompt_id!r} must match {PROMPT_ID_PATTERN} "
                "(letters, digits, '_', '.', ':', '+', '=', '@', '-'; max 128; no '/', quotes or spaces)"
            )
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt {self.prompt_id!r} has no prompt text (got {self.prompt!r})")
        if not all(isinstance(i, str) and i for i in self.instruction_id_list):
            raise ValueError(f"prompt {self.prompt_id!r}: instruction ids must be non-empty strings, "
                             f"got {self.instruction_id_list!r}")
        if not all(isinstance(k, dict) for k in self.kwargs):
            raise ValueError(f"prompt {self.prompt_id!r}: kwargs must be a list of dicts, got {self.kwargs!r}")
        if len(self.kwargs) != len(self.instruction_id_list):
            raise ValueError(
                f"prompt {self.prompt_id!r} has {len(self.instruction_id_list)} instruction ids but "
                f"{len(self.kwargs)} kwargs dicts; give one dict per instruction ({{}} for none)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt,
                "instruction_id_list": list(self.instruction_id_list), "kwargs": [dict(k) for k in self.kwargs]}

    @classmethod
    def from_dict(cls, row: dict[str, Any], id_prefix: str = "") -> Prompt:
        """Build from a JSONL/dataset row: `prompt_id` or IFEval/IFBench's `key`; None-valued kwargs are dropped."""
        if not isinstance(row, dict):
            raise ValueError(f"a prompt row must be an object, got {type(row).__name__}")
        if "prompt_id" not in row and "key" not in row:
            raise ValueError(f"a prompt row needs 'prompt_id' (or 'key'); it has {sorted(row)}")
        raw_id = row["prompt_id"] if "prompt_id" in row else row["key"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise ValueError(f"prompt id must be a string or an integer, got {raw_id!r}")
        ids = row.get("instruction_id_list") or []
        kwargs = row.get("kwargs")
        kwargs = [{} for _ in ids] if kwargs is None else kwargs
        if not isinstance(ids, list) or not isinstance(kwargs, list):
            raise ValueError(f"prompt {raw_id!r}: instruction_id_list and kwargs must be lists")
        kwargs = [{k: v for k, v in kw.items() if v is not None} if isinstance(kw, dict) else kw for kw in kwargs]
        return cls(f"{id_prefix}{raw_id}", row.get("prompt"), list(ids), kwargs)
