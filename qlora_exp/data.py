"""Training and held-out rows, from local JSON-lines files or the hub, as the dicts trl's SFTTrainer takes.

Accepted rows: `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}` with at
least one assistant turn, or `{"instruction": str, "input": str (optional), "response"|"output": str}`
(both become `{"messages": [...]}`), or pre-tokenized `{"input_ids": [int, ...]}` (trained on every token;
benchmarks use these). Bad rows raise `ConfigError` naming the file and line, before any model is loaded.
"""
import json
import random

from omegaconf import DictConfig

from qlora_exp.errors import ConfigError

ROLES = ("system", "user", "assistant")
ROW_FORMS = ('{"messages": [{"role": ..., "content": ...}, ...]} with an assistant turn, '
             'or {"instruction": ..., "response": ...}, or {"input_ids": [int, ...]}')


def to_messages(row: dict, where: str, system_prompt: str | None = None) -> list[dict]:
    """One row -> a list of chat messages; `where` names the row in errors (file:line)."""
    if not isinstance(row, dict):
        raise ConfigError(where, row, ROW_FORMS)
    if "messages" in row:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                           for m in msgs)
                or not any(m["role"] == "assistant" for m in msgs)):
            raise ConfigError(f"{where} messages", msgs, ROW_FORMS)
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    else:
        response = row.get("response", row.get("output"))
        if not isinstance(row.get("instruction"), str) or not isinstance(response, str):
            raise ConfigError(where, {k: row[k] for k in list(row)[:3]}, ROW_FORMS)
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def to_row(row, where: str, system_prompt: str | None = None) -> dict:
    """One JSON row -> `{"messages": [...]}`, or `{"input_ids": [...]}` for a pre-tokenized row."""
    if isinstance(row, dict) and "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ConfigError(f"{where} input_ids", str(ids)[:40], "a non-empty list of token ids (integers >= 0)")
        return {"input_ids": ids}
    return {"messages": to_messages(row, where, system_prompt)}


def read_jsonl(path: str, key: str, system_prompt: str | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key} {path}:{i}", line.strip()[:60], f"one JSON object per line ({e.msg})") from None
            rows.append(to_row(row, f"{key} {path}:{i}", system_prompt))
    if not rows:
        raise ConfigError(key, path, "a JSON-lines file with at least one row")
    kinds = {next(iter(r)) for r in rows}
    if len(kinds) > 1:
        raise ConfigError(key, path, "rows of one kind: all chat/instruction rows or all input_ids rows")
    return rows


def load_rows(data: DictConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) lists of rows; eval is held out from train when no eval file is given."""
    if data.source == "hub":
        from datasets import load_dataset

        def split(name, cap):
            ds = load_dataset(data.hub_name, split=name, revision=data.get("revision"))
            if cap:
                ds = ds.select(range(min(cap, len(ds))))
            return [to_row(r, f"data {data.hub_name}[{name}]", data.system_prompt) for r in ds]
        return split(data.train_split, data.max_train_rows), split(data.eval_split, data.max_eval_rows)

    train = read_jsonl(data.train_path, "data.train_path", data.system_prompt)
    if data.eval_path:
        evals = read_jsonl(data.eval_path, "data.eval_path", data.system_prompt)
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * data.eval_fraction))
        if n_eval >= len(train):
            raise ConfigError("data.train_path", data.train_path,
                              f"at least 2 rows to hold out eval_fraction={data.eval_fraction}")
        held = set(order[:n_eval])
        evals = [train[i] for i in sorted(held)]
        train = [r for i, r in enumerate(train) if i not in held]
    if data.max_train_rows:
        train = train[: data.max_train_rows]
    if data.max_eval_rows:
        evals = evals[: data.max_eval_rows]
    if "input_ids" in train[0] and data.assistant_only_loss:
        raise ConfigError("data.assistant_only_loss", True, "false for pre-tokenized input_ids rows (they have no "
                          "assistant turns: every token is trained)")
    if next(iter(train[0])) != next(iter(evals[0])):
        raise ConfigError("data.eval_path", data.eval_path, "rows of the same kind as data.train_path")
    return train, evals


def first_target(row: dict, tokenizer, assistant_only_loss: bool) -> int | None:
    """How many leading tokens of `row` a trial must keep for the row to have a token to train on (None: none at any
    length). trl cuts every row to `trainer.max_length` and drops one left with no target; a row's first token is
    never a target (nothing precedes it). With assistant_only_loss a chat row's targets are its assistant tokens,
    as the tokenizer's chat template marks them ({% generation %})."""
    if "input_ids" in row:
        return 2 if len(row["input_ids"]) >= 2 else None
    if not assistant_only_loss:
        return 2  # a chat template renders any row to more than one token
    mask = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)["assistant_masks"]
    return next((i + 1 for i, bit in enumerate(mask) if bit and i >= 1), None)


def check_max_length(data: DictConfig, max_length: int, tokenizer, train: list[dict], evals: list[dict]) -> None:
    """Refuse a `trainer.max_length` below which no training row (or no held-out row) keeps a token to train on
    (evaluate): trl would drop them all, and the trial end in a traceback. Also refuse assistant_only_loss when the
    tokenizer's chat template marks no assistant token. The rows with the shortest prompts (in characters) are
    tokenized first: one of them usually settles it; only a refusal tokenizes every row."""
    aol = bool(data.assistant_only_loss)
    for rows, where, use in ((train, _source(data, "train"), "train on"), (evals, _source(data, "eval"), "evaluate")):
        ordered = sorted(rows, key=_prompt_chars)
        needs = [n for r in ordered[:64] if (n := first_target(r, tokenizer, aol)) is not None]
        if any(n <= max_length for n in needs):
            continue
        needs += [n for r in ordered[64:] if (n := first_target(r, tokenizer, aol)) is not None]
        if not needs and aol and "messages" in rows[0]:
            raise ConfigError("data.assistant_only_loss", True, "false for this tokenizer: its chat template marks no "
                              "assistant tokens ({% generation %}), so no row has a token to train on")
        if not needs:
            raise ConfigError(where, f"{len(rows)} rows", "rows of at least 2 tokens (a row's first token is never "
                              f"a target): none of these has a token to {use}")
        if min(needs) > max_length:
            first = "assistant token (chat template included)" if aol and "messages" in rows[0] else "target token"
            raise ConfigError("trainer.max_length", max_length, f"an integer >= {min(needs)} for these rows and this "
                              f"tokenizer: shorter, every row of {where} is cut before its first {first}, "
                              f"leaving nothing to {use}")


def _prompt_chars(row: dict) -> int:
    if "input_ids" in row:
        return 0
    msgs = row["messages"]
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    return sum(len(m["content"]) for m in msgs[:first])


def _source(data: DictConfig, split: str) -> str:
    if data.source == "hub":
        return f"{data.hub_name} [{data.train_split if split == 'train' else data.eval_split}]"
    if split == "train" or data.get("eval_path"):
        return f"data.{split}_path"
    return "the rows held out of data.train_path"
