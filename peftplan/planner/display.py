"""The plan on the terminal: ranked table, per-method limits, explanation and notes (rich)."""

from __future__ import annotations

from ..units import fmt_count, fmt_gib
from .explain import _fmt_duration
from .ranking import ties_with
from .space import PlanResult, PlanRow


def plan_table(result: PlanResult, limit: int = 15, distinct: bool = True):  # type: ignore[no-untyped-def]
    """The ranked configurations as a rich Table (rich imported only here).

    With `distinct`, only the best row of each method variant, checkpointing and attention is shown
    (the others differ only in micro-batch or optimizer)."""
    from rich.table import Table

    fits = bool(result.rows)
    title = (f"{result.model} on {result.gpu.name} ({fmt_gib(result.gpu.memory_bytes)}), seq {result.seq_len}, "
             f"trainer {result.trainer}: "
             + (f"configurations that fit, by {result.objective} ('=' ties with the row above)" if fits
                else "nothing fits; least memory first"))
    from rich.text import Text

    table = Table(title=Text(title))  # a model name is a user string: never rich markup
    for col, just in (("#", "right"), ("method", "left"), ("batch", "right"), ("ckpt", "left"), ("attn", "left"),
                      ("optimizer", "left"), ("device memory", "right"), ("headroom", "right"),
                      ("tokens/s", "right"), ("quality prior", "right"), ("trainable", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    if result.n_gpus > 1:
        table.add_column(f"x{result.n_gpus} GPUs", justify="left")
    if result.tokens is not None:
        table.add_column("time", justify="right")
        table.add_column("cost", justify="right")
    source = result.rows if fits else result.closest
    shown: list[PlanRow] = []
    seen: set[tuple[str, bool, str, str]] = set()
    for r in source:
        key = (r.config.variant.label, r.config.grad_ckpt, r.config.attention, r.config.shard)
        if distinct and key in seen:
            continue
        seen.add(key)
        shown.append(r)
        if len(shown) >= limit:
            break
    for i, r in enumerate(shown, 1):
        c = r.config
        tie = fits and i > 1 and ties_with(shown[i - 2], r, result.objective)  # against the row shown above
        batch = str(c.micro_batch) + (f" x{c.grad_accum}" if c.grad_accum > 1 else "")
        cells = [("=" if tie else "") + str(i), c.variant.label, batch, "on" if c.grad_ckpt else "off",
                 c.attention, c.optimizer,
                 fmt_gib(r.device_total_bytes), fmt_gib(r.headroom_bytes) if r.fits else "does not fit",
                 f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-",
                 f"{r.quality:.3f}" if r.quality is not None else "?", fmt_count(r.trainable_params)]
        if result.n_gpus > 1:
            cells.append(c.shard)
        if result.tokens is not None:
            cells.append(_fmt_duration(r.train_time_s) if r.train_time_s else "-")
            cells.append(f"${r.train_cost_usd:,.2f}" if r.train_cost_usd is not None else "-")
        table.add_row(*cells)
    return table


def print_plan(result: PlanResult, limit: int = 15, distinct: bool = True) -> None:
    """Table, per-method limits, explanation and notes on the terminal (user strings never as markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal and console.width < 150:
        console = Console(highlight=False, width=150)  # piped: do not squeeze the columns to 80
    console.print(plan_table(result, limit, distinct))
    lim = Table(title="largest that fits, per method (any searched setting)")
    for col in ("method", "seq (batch 1)", "with", "batch (seq %d)" % result.seq_len, "with"):
        lim.add_column(col)
    for m in result.limits:
        mb = "-"
        if m.max_micro_batch:
            mb = str(m.max_micro_batch) + ("+" if m.max_micro_batch >= m.micro_batch_searched_to else "")
        lim.add_row(m.method, (str(m.max_seq_len) + (" (context)" if m.seq_limited_by_context else "")) if m.max_seq_len else "-",
                    _setting(m.max_seq_row), mb, _setting(m.max_micro_batch_row))
    if result.limits:
        console.print(lim)
    console.print(Text("why: " if result.rows else "") + Text(result.explanation))
    if result.rows:
        console.print(Text("quality prior: GSM8K accuracy of the method family in PEFT's MetaMathQA comparison "
                           "(Llama-3.2-3B), adjusted by the QLoRA and LoRA papers; sources in "
                           "peftplan/data/quality_prior.json", style="dim"))
    for n in result.notes:
        console.print(Text(f"note: {n}", style="dim"))
    for what, why in result.skipped:
        console.print(Text(f"skipped {what}: {why}", style="dim"))
    st = result.stats
    console.print(Text(f"{st.configs_evaluated} configurations and {st.fit_checks} fit checks in {st.seconds:.2f} s "
                       f"({st.structures_recorded} symbolic steps recorded, {st.direct} direct estimates)", style="dim"))


def _setting(row: PlanRow | None) -> str:
    if row is None:
        return "-"
    c = row.config
    return f"{c.variant.label}, ckpt {'on' if c.grad_ckpt else 'off'}, {c.attention}, {c.optimizer}"
