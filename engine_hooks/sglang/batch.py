"""Reading an SGLang ``ScheduleBatch`` into step columns, across SGLang versions.

Everything here reads what SGLang already computed for the batch, on the CPU, and
never touches a CUDA tensor (that would synchronize the GPU):

* ``batch.forward_mode`` — by *name*, so a mode added in a later release (or
  removed) never breaks the import: EXTEND / SPLIT_PREFILL / DLLM_EXTEND /
  MIXED read per-request extend lengths; DECODE and TARGET_VERIFY (speculative
  verification) are decode steps; IDLE is a step with no entries (on a DP-attention
  rank with no work, that time is spent waiting for its peers); PREBUILT and draft
  passes are not steps of their own.
* ``batch.reqs`` with ``batch.extend_lens`` / ``batch.prefix_lens`` aligned to them;
  ``batch.decoding_reqs`` names the requests that decode inside a MIXED (or, in
  0.5.23, converted 1-token EXTEND) batch — the mode alone does not say who decoded.
* ``batch.global_num_tokens``: every DP rank's token count this step (``peer_tokens``).

The context (KV length before the step) of a decode entry is the request's known
tokens minus one; under overlap scheduling ``output_ids`` trails by a token, which
is within the precision the cost model needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..adapter_common import int_list
from ..constants import StepKind

#: forward modes whose entries come from extend_lens / prefix_lens
EXTEND_MODES = frozenset({"EXTEND", "MIXED", "SPLIT_PREFILL", "DLLM_EXTEND"})
DECODE_MODES = frozenset({"DECODE", "TARGET_VERIFY"})
IDLE_MODES = frozenset({"IDLE"})

#: every attribute this module reads, by owner (checked against SGLang's source in tests)
BATCH_ATTRS = (
    "forward_mode",
    "reqs",
    "extend_lens",
    "prefix_lens",
    "decoding_reqs",
    "global_num_tokens",
    "spec_info",
)
REQ_ATTRS = ("rid", "origin_input_ids", "output_ids", "cached_tokens", "finished_reason", "is_retracted")


@dataclass(slots=True)
class StepRead:
    """One batch as step columns (requests kept as objects; handles come later)."""

    kind: StepKind
    mode: str
    reqs: list[Any] = field(default_factory=list)
    prefill: list[int] | int = field(default_factory=list)  # an int: every entry's value
    decode: list[int] | int = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    peer_tokens: list[int] | None = None
    first_prefix: dict[int, int] = field(default_factory=dict)  # id(req) -> prefix hit, extend steps
    handles: list[int] = field(default_factory=list)  # filled by the adapter
    rids: list[str] = field(default_factory=list)
    batch: Any = None  # the adapter's record of these requests (what a repeat of this batch reuses)
    held: bool = False  # its requests are held in flight by ``batch``, not one by one


def mode_name(batch: Any) -> str:
    mode = getattr(batch, "forward_mode", None)
    name = getattr(mode, "name", None)
    return str(name) if name is not None else ""


def known_tokens(req: Any) -> int:
    try:
        return len(req.origin_input_ids) + len(req.output_ids)
    except Exception:
        return 0


def _draft_tokens(batch: Any) -> int:
    """Tokens verified per request in a TARGET_VERIFY step (speculative decoding)."""
    spec = getattr(batch, "spec_info", None)
    n = getattr(spec, "draft_token_num", None)
    return n if isinstance(n, int) and n > 0 else 1


def read_batch(batch: Any) -> StepRead | None:
    """The step columns of ``batch``; None when the batch is not a forward of its own.

    Raises on a batch whose lists disagree (the caller counts it and drops the step).
    """
    name = mode_name(batch)
    peer = int_list(getattr(batch, "global_num_tokens", None))
    if name in IDLE_MODES:
        return StepRead(StepKind.IDLE, name, peer_tokens=peer)
    reqs = list(getattr(batch, "reqs", None) or ())
    if name in DECODE_MODES:
        per = _draft_tokens(batch) if name == "TARGET_VERIFY" else 1
        # Every entry prefills 0 and decodes ``per``: one int each (Recorder.step_end), so the
        # engine thread builds one list per step here, not three.
        out = StepRead(StepKind.DECODE, name, reqs=reqs, prefill=0, decode=per, peer_tokens=peer)
        out.context = [max(0, known_tokens(req) - 1) for req in reqs]
        return out if reqs else StepRead(StepKind.IDLE, name, peer_tokens=peer)
    if name not in EXTEND_MODES:
        return None  # PREBUILT, draft passes, modes this adapter does not know
    extend = int_list(getattr(batch, "extend_lens", None))
    prefix = int_list(getattr(batch, "prefix_lens", None))
    if extend is None or prefix is None or len(extend) != len(reqs) or len(prefix) != len(reqs):
        raise ValueError(
            f"{name} batch with {len(reqs)} reqs but extend_lens={None if extend is None else len(extend)} "
            f"prefix_lens={None if prefix is None else len(prefix)}"
        )
    decoding = {id(r) for r in (getattr(batch, "decoding_reqs", None) or ())}
    prefill: list[int] = []
    decode: list[int] = []
    out = StepRead(StepKind.PREFILL, name, reqs=reqs, prefill=prefill, decode=decode, peer_tokens=peer)
    n_pre = n_dec = 0
    for req, n, ctx in zip(reqs, extend, prefix, strict=True):
        if id(req) in decoding:
            prefill.append(0)
            decode.append(n)
            n_dec += n
        else:
            prefill.append(n)
            decode.append(0)
            out.first_prefix[id(req)] = ctx
            n_pre += n
        out.context.append(ctx)
    out.kind = (
        StepKind.MIXED if n_pre and n_dec else StepKind.DECODE if n_dec and not n_pre else StepKind.PREFILL
    )
    return out
