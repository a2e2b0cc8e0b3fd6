"""The provider names and the cases of a results document, from the JSON alone (no torch, so that
the rendering, the plots and the README section need nothing else).

A *case* is one (op, shape, dtype, mode). Its *reference* rows are every provider that is not
vitkern's (``torch``, ``torch.compile``, ``torchvision``, ``sdpa-*``, ``flash-attn``, ``xformers``);
its *best reference* is the fastest of those that ran. The vitkern row of a case is the first of
:data:`VITKERN_HEADLINE` that ran: ``vitkern`` (backend "auto", what a user gets) when present.
The headline cases (:func:`headline_cases`) are what ``summary.md``, the README section and the
plots lead with.
"""

from __future__ import annotations

from typing import Iterable, Optional

# Report order. The torch provider always runs first: its results are the correctness reference.
# "vitkern" is backend "auto" (what a user gets: the measured choice per op and shape class); the
# other vitkern providers pin one backend.
PROVIDERS = (
    "vitkern", "vitkern-triton", "vitkern-cuda", "vitkern-torch", "vitkern-reference", "torch", "torch.compile",
)
# The packed variable-length attention setup's references: SDPA on the padded batch with a dense
# mask (as timm's NaFlexVit runs it), torch's own varlen_attn and FlexAttention with a document
# mask (flash-attn's varlen function is its "flash-attn" row).
VARLEN_PROVIDERS = ("sdpa-padded", "torch-varlen", "flex-document")
# The attention setups' SDPA held to one backend (provider name -> torch.nn.attention.SDPBackend
# member), then the attention libraries.
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
ATTENTION_PROVIDERS = tuple(SDPA_BACKENDS) + ("flash-attn", "xformers")
# References that only some cases supply, through Case.references: torchvision for the model
# setups; SDPA held to one backend, flash-attn and xformers for the attention setups; the packed
# attention setup's own; vitkern-padded for the mixed-resolution model setup (vitkern's model on
# the padded batch); the launch variants above.
# vitkern's attention with one launch choice forced (the attention_*_variants setups), and the
# position-embedding resampling in its one-pass order (the pos_resample setup): vitkern rows, not
# references.
LAUNCH_VARIANT_PROVIDERS = ("vitkern-pointer-loads", "vitkern-no-split", "vitkern-bwd-fused", "vitkern-bwd-atomic",
                            "vitkern-bwd-dq-kernel", "vitkern-one-pass")
EXTRA_PROVIDERS = ("torchvision", "vitkern-padded") + ATTENTION_PROVIDERS + VARLEN_PROVIDERS + LAUNCH_VARIANT_PROVIDERS
ALL_PROVIDERS = PROVIDERS + EXTRA_PROVIDERS
VITKERN_HEADLINE = ("vitkern", "vitkern-triton", "vitkern-cuda", "vitkern-torch", "vitkern-reference")


def is_reference(provider: str) -> bool:
    """Every provider that is not one of vitkern's backends is a reference to compare against."""
    return not provider.startswith("vitkern")


# Every provider that is not vitkern's: the ratios speedup_vs are against these.
REFERENCE_PROVIDERS = tuple(p for p in ALL_PROVIDERS if is_reference(p))


def case_key(row: dict) -> tuple:
    return (row["op"], row["label"], row["dtype"], row["mode"])


def cases(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by case, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(case_key(r), []).append(r)
    return out


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and bool(row.get("median_ms"))


def best_reference(members: Iterable[dict]) -> Optional[dict]:
    """The fastest reference row that ran in one case, or None."""
    refs = [r for r in members if is_reference(r["provider"]) and _ok(r)]
    return min(refs, key=lambda r: r["median_ms"]) if refs else None


def vitkern_row(members: Iterable[dict]) -> Optional[dict]:
    """The case's vitkern row: the first of :data:`VITKERN_HEADLINE` that ran, else the first present."""
    by = {r["provider"]: r for r in members}
    for p in VITKERN_HEADLINE:
        if p in by and _ok(by[p]):
            return by[p]
    for p in VITKERN_HEADLINE:
        if p in by:
            return by[p]
    return None


def speedup_vs_best(members: list[dict]) -> tuple[Optional[dict], Optional[dict], Optional[float]]:
    """``(vitkern row, best reference row, best reference ms / vitkern ms)`` of one case."""
    vk, ref = vitkern_row(members), best_reference(members)
    if vk is None or ref is None or not _ok(vk):
        return vk, ref, None
    return vk, ref, ref["median_ms"] / vk["median_ms"]


def _is_model(doc: dict, op: str) -> bool:
    """Whether ``op`` is a whole-model setup: the run's config says so (``model_ops``); older
    documents without it: the op has a training-step mode."""
    model_ops = doc.get("config", {}).get("model_ops")
    if model_ops is not None:
        return op in model_ops
    return any(r["op"] == op and r["mode"] == "train" for r in doc["rows"])


def headline_cases(doc: dict) -> list[tuple[tuple, list[dict]]]:
    """The cases of the headline table: each op's first shape (its ``--quick`` shape) in every mode;
    for a whole-model setup, every batch of its first model in the run."""
    rows = doc["rows"]
    grouped = cases(rows)
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r["op"], r)
    picked = []
    for key, members in grouped.items():
        op, label = key[0], key[1]
        head = first[op]
        if label == head["label"]:
            picked.append((key, members))
        elif (
            _is_model(doc, op)
            and members[0]["shape"].get("name")
            and members[0]["shape"].get("name") == head["shape"].get("name")
        ):
            picked.append((key, members))
    # a model's batch sweep reads best in mode then batch order (the run order is by interest)
    op_rank = {op: i for i, op in enumerate(first)}
    mode_rank = {"fwd": 0, "fwd+bwd": 1, "train": 2}

    def order(item):
        (op, _label, _dtype, mode), members = item
        if not _is_model(doc, op):
            return (op_rank[op], 0, 0)
        return (op_rank[op], mode_rank.get(mode, 9), members[0]["shape"].get("batch") or 0)

    return sorted(picked, key=order)


def headline_table(doc: dict) -> list[dict]:
    """One dict per headline case: op, shape, mode, vitkern_provider, vitkern_ms, best_reference,
    reference_ms, speedup, pct_of_ceiling, items_per_s, status (the vitkern row's, or why none)."""
    out = []
    for (op, label, dtype, mode), members in headline_cases(doc):
        vk, ref, speedup = speedup_vs_best(members)
        ok = vk is not None and _ok(vk)
        out.append(
            {
                "op": op,
                "shape": label,
                "dtype": dtype,
                "mode": mode,
                "vitkern_provider": vk["provider"] if vk else None,
                "vitkern_ms": vk["median_ms"] if ok else None,
                "best_reference": ref["provider"] if ref else None,
                "reference_ms": ref["median_ms"] if ref else None,
                "speedup": speedup,
                "pct_of_ceiling": vk.get("pct_of_ceiling") if ok else None,
                "items_per_s": vk.get("items_per_s") if ok else None,
                "status": (vk["status"] if vk else "no vitkern row") if not ok else "ok",
            }
        )
    return out
