"""The before/after evaluation as markdown: what ``scripts/evaluate.py``, the end of a run and the card print.

Input is the result mapping of ``recipes.evaluate.run_evaluation`` (or ``run_evaluator.RunEvaluator.finish``):
``settings``, ``pairs`` (where the pairs came from), ``base``/``adapter`` (metrics of
``scoring.summarise``), ``change`` (``scoring.compare_scores``: paired intervals) and
optionally ``health`` (``health.health_side_by_side``). Plain text in, plain text out.
"""

from __future__ import annotations

from typing import Any

# What the preference table shows, in order: (key, label, format).
TABLE_ROWS = (
    ("reward_accuracy", "reward accuracy (log-odds w > l)", "{:.3f}"),
    ("log_odds_ratio", "mean log-odds ratio", "{:+.4f}"),
    ("reward_margin", "mean reward margin beta * (logp_w - logp_l)", "{:+.5f}"),
    ("chosen_logp", "chosen mean log-prob per token", "{:.4f}"),
    ("rejected_logp", "rejected mean log-prob per token", "{:.4f}"),
    ("nll", "chosen NLL", "{:.4f}"),
    ("or_loss", "odds-ratio loss L_OR", "{:.4f}"),
    ("loss", "ORPO loss", "{:.4f}"),
)
HEALTH_ROWS = (
    ("ended_rate", "replies ending with end-of-turn/EOS", "{:.3f}"),
    ("seq_rep_4", "seq-rep-4 (mean per reply)", "{:.3f}"),
    ("distinct_2", "distinct-2 (across replies)", "{:.3f}"),
    ("mean_length", "mean reply length (tokens)", "{:.1f}"),
)
SHOWN_CHARS = 400  # of each prompt and reply in the side-by-side examples


def _signed(fmt: str) -> str:
    return fmt if "+" in fmt else fmt.replace("{:", "{:+", 1)


def _value(metrics: dict[str, Any], key: str, fmt: str) -> str:
    text = fmt.format(metrics[key])
    if key == "reward_accuracy" and "reward_accuracy_low" in metrics:
        text += f" [{metrics['reward_accuracy_low']:.3f}, {metrics['reward_accuracy_high']:.3f}]"
    return text


def _change(change: dict[str, Any] | None, base: dict[str, Any], adapter: dict[str, Any], key: str, fmt: str) -> str:
    signed = _signed(fmt)
    if change and key in change:
        c = change[key]
        return f"{signed.format(c['change'])} [{signed.format(c['low'])}, {signed.format(c['high'])}]"
    return signed.format(adapter[key] - base[key])


def heading(result: dict[str, Any]) -> str:
    settings, pairs = result["settings"], result["pairs"]
    if pairs.get("split") == "test":
        return (
            f"Test split: {pairs['evaluated']} pairs (of {pairs['held_out']} kept out at test_fraction "
            f"{settings.get('test_fraction')} from {pairs['data']}; never trained on, never used to select), "
            f"max_length {settings['max_length']}, beta {settings['beta']}, "
            f"{'unquantised' if settings['quant'] == 'none' else settings['quant']} base."
        )
    held = (f"of {pairs['held_out']} in the evaluation data {pairs['data']}" if settings.get("eval_data") else
            f"of {pairs['held_out']} held out at eval_fraction {settings['eval_fraction']} from {pairs['data']}")
    return (
        f"Held-out evaluation: {pairs['evaluated']} pairs ({held}), max_length {settings['max_length']}, "
        f"beta {settings['beta']}, NLL over {'prompt + response' if settings['nll_over_prompt'] else 'response'}, "
        f"{'unquantised' if settings['quant'] == 'none' else settings['quant']} base."
    )


def preference_table(result: dict[str, Any]) -> list[str]:
    base, adapter, change = result["base"], result.get("adapter"), result.get("change")
    if adapter is None:
        lines = ["| metric | base |", "|---|---:|"]
        return lines + [f"| {label} | {_value(base, key, fmt)} |" for key, label, fmt in TABLE_ROWS if key in base]
    lines = ["| metric | base | base + adapter | change [95% CI] |", "|---|---:|---:|---:|"]
    for key, label, fmt in TABLE_ROWS:
        if key in base and key in adapter:
            lines.append(f"| {label} | {_value(base, key, fmt)} | {_value(adapter, key, fmt)} | "
                         f"{_change(change, base, adapter, key, fmt)} |")
    lines.append("")
    notes = "Accuracy columns: 95% Wilson intervals. Change: adapter minus base on the same pairs"
    if change:
        notes += (f", 95% paired bootstrap interval; {change['gained']} pairs turned right, "
                  f"{change['lost']} turned wrong")
    notes += ". Chosen and rejected log-probs both falling is collapse, not preference."
    lines.append(notes)
    return lines


def health_table(health: dict[str, Any]) -> list[str]:
    base, adapter = health["base"]["metrics"], health["adapter"]["metrics"]
    change = health["change"]
    lines = [
        f"Generation health: {int(base['prompts'])} held-out prompts, greedy, at most "
        f"{health['max_new_tokens']} new tokens.",
        "",
        "| generation health | base | base + adapter | change |",
        "|---|---:|---:|---:|",
    ]
    for key, label, fmt in HEALTH_ROWS:
        lines.append(f"| {label} | {fmt.format(base[key])} | {fmt.format(adapter[key])} | "
                     f"{_signed(fmt).format(change[key])} |")
    lines.append(f"| median length ratio to the base | 1.00 | {change['median_length_ratio']:.2f} | |")
    gate = health["gate"]
    lines += ["", f"Health gate (end-of-turn rate at most 5 points below the base's, seq-rep-4 at most "
                  f"0.05 above): {'passes' if gate['passes'] else 'FAILS: ' + gate['why']}."]
    return lines


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def replies_side_by_side(health: dict[str, Any], count: int) -> list[str]:
    base, adapter = health["base"], health["adapter"]
    lines: list[str] = []
    for i, prompt in enumerate(base["prompts"][:count]):
        lines += ["", f"**Prompt {i + 1}:** {_clip(prompt)}", ""]
        for name, side in (("base", base), ("base + adapter", adapter)):
            reply = side["replies"][i]
            how = "ended" if reply["ended"] else "did not end"
            length = reply["length"] if "length" in reply else len(reply["ids"])  # the card keeps no ids
            lines.append(f"- *{name}* ({length} tokens, {how}): {_clip(reply['text']) or '(empty)'}")
    return lines


def markdown_report(result: dict[str, Any], show_replies: int = 3) -> str:
    """The heading line, the preference table, and with ``health`` its table and a few replies side by side."""
    lines = [heading(result), "", *preference_table(result)]
    health = result.get("health")
    if health and health.get("adapter") is not None:
        lines += ["", *health_table(health)]
        if show_replies > 0:
            lines += ["", f"Replies side by side (first {min(show_replies, len(health['base']['prompts']))}):",
                      *replies_side_by_side(health, show_replies)]
    elif health and health.get("base") is not None:
        metrics = health["base"]["metrics"]
        lines += ["", f"Generation health of the base ({int(metrics['prompts'])} prompts, greedy): " + ", ".join(
            f"{label} {fmt.format(metrics[key])}" for key, label, fmt in HEALTH_ROWS)]
    return "\n".join(lines)


# What a sweep compares, one row per run (scripts/sweep_table.py): (label, config keys shown).
SWEEP_SETTINGS = ("learning_rate", "beta", "max_steps", "grad_accum", "epochs", "lora_r", "lora_alpha",
                  "max_length", "nll_over_prompt")


def sweep_table(runs: list[tuple[str, dict[str, Any], dict[str, Any], float | None]]) -> str:
    """One markdown row per run: ``(name, config, evaluation.json result, training minutes or None)``."""
    lines = [
        "| run | " + " | ".join(SWEEP_SETTINGS) + " | minutes | step | accuracy base -> adapter | gain [95% CI] "
        "| chosen NLL change | ended base -> adapter | seq-rep-4 base -> adapter | distinct-2 base -> adapter | gate |",
        "|---|" + "---:|" * len(SWEEP_SETTINGS) + "---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, config, result, minutes in runs:
        acc = result["change"]["reward_accuracy"]
        health = result.get("health")
        ended = rep = distinct = gate = "-"
        if health:
            b, a = health["base"]["metrics"], health["adapter"]["metrics"]
            ended = f"{b['ended_rate']:.2f} -> {a['ended_rate']:.2f}"
            rep = f"{b['seq_rep_4']:.3f} -> {a['seq_rep_4']:.3f}"
            distinct = f"{b['distinct_2']:.2f} -> {a['distinct_2']:.2f}"
            gate = "pass" if health["gate"]["passes"] else "FAIL"
        settings = " | ".join(str(config.get(k, "")) for k in SWEEP_SETTINGS)
        lines.append(
            f"| {name} | {settings} | {'-' if minutes is None else f'{minutes:.1f}'} | "
            f"{result.get('selected_step', '-')} | {result['base']['reward_accuracy']:.3f} -> "
            f"{result['adapter']['reward_accuracy']:.3f} | {acc['change']:+.3f} [{acc['low']:+.3f}, {acc['high']:+.3f}] | "
            f"{result['change']['nll']['change']:+.3f} | {ended} | {rep} | {distinct} | {gate} |"
        )
    return "\n".join(lines)
