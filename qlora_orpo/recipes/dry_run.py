"""``finetune.py --dry-run``: load the config, data and tokenizer, say what would be trained on."""

from __future__ import annotations

from ..config import OrpoConfig
from ..data.mixture import describe_shared, load_run_data, parts_of, shared_pairs
from ..data.preferences import PreferenceData
from ..data.templating import ChatFormat, has_chat_template, show_example, tokenize_pairs


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles of a list of lengths, as ``{"p50": …, "max": …}``."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))
        out["max" if p == 100 else f"p{p}"] = ordered[index]
    return out


def describe_data(data: PreferenceData, label: str = "data") -> list[str]:
    lines = [
        f"{label + ':':<10} {data.source}",
        f"shape:     {data.shape} (detected)",
        f"rows:      {data.total_rows} read, {len(data.pairs)} pairs kept, {len(data.skipped)} skipped",
    ]
    parts = parts_of(data)
    if len(parts) > 1:  # several sources: each one's own count and shape, shuffled together by seed
        for part in parts:
            lines.append(f"  source   {part.source}: {part.shape}, {part.total_rows} rows read, "
                         f"{len(part.pairs)} pairs kept, {len(part.skipped)} skipped")
    for reason, count in sorted(data.skip_reasons().items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped  {count:>5} x {reason}")
    for line in data.describe_skipped(limit=5):
        lines.append(f"    e.g.   {line}")
    return lines


def dry_run(cfg: OrpoConfig, show_examples: int = 0) -> int:
    from ..models.loader import load_tokenizer, resolve_model_path

    loaded = load_run_data(cfg)
    data, train_pairs, eval_pairs = loaded.data, loaded.train, loaded.held_out
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    train_tok, train_stats = tokenize_pairs(train_pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    eval_tok, eval_stats = tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    lines = describe_data(data)
    if loaded.eval_data is not None:
        lines += describe_data(loaded.eval_data, "eval data")
        split = f"split:     {len(train_pairs)} train (all of data) / {len(eval_pairs)} held out (all of eval data)"
        if warning := describe_shared(shared_pairs(train_pairs, eval_pairs)):
            split += "\n" + warning
    else:
        split = f"split:     {len(train_pairs)} train / {len(eval_pairs)} held out (eval_fraction={cfg.eval_fraction})"
    if loaded.test:
        split += f" / {len(loaded.test)} test (test_fraction={cfg.test_fraction}; scored once, at the end)"
    lines += [
        split,
        f"model:     {model_path}",
        f"template:  {_describe_template(tokenizer)}"
        + (f" (--chat-template {cfg.chat_template})" if cfg.chat_template else ""),
        f"system:    {cfg.system_prompt!r} for prompts without a system turn" if cfg.system_prompt else None,
        f"lengths:   max_length={cfg.max_length}, max_prompt_length={cfg.max_prompt_length} (tokens, before truncation)",
        f"  prompt   {_fmt(percentiles(train_stats.prompt_lengths))}",
        f"  pair     {_fmt(percentiles(train_stats.sequence_lengths))}  (prompt + longer response)",
        f"truncated: {train_stats.truncated_prompt} prompts, {train_stats.truncated_response} pairs' responses (train)",
        f"dropped:   {len(train_stats.dropped_rows) + len(eval_stats.dropped_rows)} pairs with an empty response after truncation",
        f"system:    {train_stats.system_folded} train prompts had their system turn folded into the first user turn"
        if train_stats.system_folded else "system:    kept as the template writes it (or none in the data)",
        f"trainable: {len(train_tok)} train pairs, {len(eval_tok)} eval pairs after tokenisation",
    ]
    lines = [line for line in lines if line is not None]
    lines += [show_example(tokenizer, pair) for pair in train_tok[:show_examples]]
    lines.append("dry run: nothing trained.")
    print("\n".join(lines))
    return 0


def _describe_template(tokenizer) -> str:
    fmt = ChatFormat.of(tokenizer)
    end = tokenizer.decode(list(fmt.end_ids), skip_special_tokens=False)
    if not has_chat_template(tokenizer):
        return f"plain prompt + response (no chat template); replies end with {end!r}"
    refuses = "; refuses a system turn (folded into the first user turn)" if fmt.folds_system else ""
    return f"chat template; replies end with {end!r}{refuses}"


def _fmt(p: dict[str, int]) -> str:
    return "  ".join(f"{k}={v}" for k, v in p.items())
