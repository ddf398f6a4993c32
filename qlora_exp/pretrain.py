"""A pretrained embedded base: the tiny Llama shape pretrained here, offline, on text every machine has, the Python
standard library's docstrings and `#` comments (with the shipped training rows' plain text).

    python -m qlora_exp.pretrain                                    # build model=tiny_pretrained (~2.5 min, 2 CPU cores)
    python -m qlora_exp.pretrain model.pretrain.steps=50 paths.cache_dir=/tmp/c   # any config override
    python -m qlora_exp model=tiny_pretrained                       # a trial builds it on first use just the same

Fine-tuning the random-weight tiny base rewards every bit of adaptation, so its best learning rate sits at the top of
search=rank_alpha_lr's range; on this base it lies inside (docs/benchmarks.md, "A pretrained embedded base").

The corpus: the stdlib's `*.py` files in sorted order (tests and `site-packages` left out), each file's docstrings
(`ast`) and comments (`tokenize`) in source order as one document, capped at `pretrain.max_chars`, every
`heldout_every`-th file held out; with `corpus: stdlib+tiny_instruct` also the strings of each shipped training row
(never the eval rows) as plain text, `instruct_repeat` times: the words and facts of the task, not its chat format.
It is extracted once per Python and settings into `<cache>/corpora/`. The tokenizer (`tokenizer: corpus`) is a
byte-level BPE of tiny's size (512) trained on the shipped rows and the corpus (`shipped`: tiny's own, trained on the
rows alone, which leaves the stdlib's text in single bytes). The weights start from the model's seed, see the packed
blocks in an order drawn from the same seed, and train with a plain AdamW loop (linear warm-up, cosine to 10 %) on the
CPU wherever the build runs: the same settings, corpus, torch and thread count give the same weights. The build is
saved with `save_pretrained` (safetensors) and its tokenizer, beside its `pretrain.json` (the settings, the corpus's
sha1, the held-out loss at init and after, the time it took).
"""
import ast
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CORPORA = ("stdlib", "stdlib+tiny_instruct")  # pretrain.corpus: the stdlib's text, or with the shipped rows' text too
TOKENIZERS = ("shipped", "corpus")  # pretrain.tokenizer: tiny's own (the shipped rows), or trained on them and the corpus
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
PROGRESS_EVERY_S = 5.0      # a progress line this often
HELDOUT_BLOCKS = 64         # blocks of held-out text the build's loss is measured on


# ---- the corpus ---------------------------------------------------------------------------------------------------
def file_text(source: str) -> str:
    """A module's docstrings and comments in source order, one paragraph each ('' when it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                parts.append((node.body[0].lineno, doc.strip()))
    comment, first, last = [], 0, -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            line = tok.start[0]
            if comment and line != last + 1:  # a gap ends the paragraph
                parts.append((first, "\n".join(comment)))
                comment = []
            if not comment:
                first = line
            if text and not text.startswith("!"):  # (a shebang or an empty line of #'s is no text)
                comment.append(text)
            last = line
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    if comment:
        parts.append((first, "\n".join(comment)))
    return "\n\n".join(text for _, text in sorted(parts, key=lambda p: p[0]) if text)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def extract_corpus(settings: dict, rows_file: Path | None) -> dict:
    """{"train": [documents], "heldout": [documents]}: the stdlib's files (in sorted order, until `max_chars`), every
    `heldout_every`-th held out; with `stdlib+tiny_instruct`, the shipped training rows' text joins the training part."""
    train, heldout, chars = [], [], 0
    for i, path in enumerate(stdlib_files()):
        try:
            text = file_text(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if not text:
            continue
        text = text[: settings["max_chars"] - chars]
        (heldout if i % settings["heldout_every"] == settings["heldout_every"] - 1 else train).append(text)
        chars += len(text)
        if chars >= settings["max_chars"]:
            break
    if settings["corpus"] == "stdlib+tiny_instruct" and rows_file is not None:
        from qlora_exp.models import _strings

        with open(rows_file) as f:  # each row's strings as plain text: the words and facts, not the chat format
            rows = ["\n".join(_strings(json.loads(line))) for line in f if line.strip()]
        train.extend(rows * settings["instruct_repeat"])
    return {"train": train, "heldout": heldout}


def corpus_settings(model_cfg: DictConfig) -> dict:
    p = model_cfg.pretrain
    return {"corpus": p.corpus, "max_chars": int(p.max_chars), "heldout_every": int(p.heldout_every),
            "instruct_repeat": int(p.get("instruct_repeat", 1))}


def load_corpus(model_cfg: DictConfig, cache_dir: str, rows_file: Path | None) -> tuple[dict, str]:
    """(the corpus, its sha1): extracted once per Python, stdlib and settings into `<cache>/corpora/`."""
    settings = corpus_settings(model_cfg)
    rows_sha = hashlib.sha1(Path(rows_file).read_bytes()).hexdigest() if (
        settings["corpus"] == "stdlib+tiny_instruct" and rows_file is not None) else None
    key = json.dumps([sysconfig.get_paths()["stdlib"], sys.version, settings, rows_sha], sort_keys=True)
    path = Path(cache_dir) / "corpora" / f"{settings['corpus']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    if path.exists():
        corpus = json.loads(path.read_text())
    else:
        start = time.perf_counter()
        corpus = extract_corpus(settings, rows_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(corpus))
        os.replace(tmp, path)
        log.info("pretraining corpus: %d + %d held-out documents, %s characters, extracted in %.1f s into %s",
                 len(corpus["train"]), len(corpus["heldout"]), f"{sum(map(len, corpus['train'] + corpus['heldout'])):,}",
                 time.perf_counter() - start, path)
    sha = hashlib.sha1(json.dumps(corpus, sort_keys=True).encode()).hexdigest()
    return corpus, sha


def pretrain_key(model_cfg: DictConfig, cache_dir: str, rows_file: Path) -> list:
    """What the build depends on beyond the shape and seed: the pretraining settings and the corpus's sha1."""
    _, sha = load_corpus(model_cfg, cache_dir, rows_file)
    return [OmegaConf.to_container(model_cfg.pretrain, resolve=True), sha]


def pack(tokenizer, documents: list[str], seq_len: int, max_blocks: int | None = None):
    """The documents' tokens, each followed by the end-of-text token, cut into blocks of `seq_len` (a LongTensor)."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
        if max_blocks is not None and len(ids) >= max_blocks * seq_len:
            break
    n = len(ids) // seq_len if max_blocks is None else min(len(ids) // seq_len, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---- training -----------------------------------------------------------------------------------------------------
def mean_loss(model, blocks, batch_size: int = 16) -> float:
    """Mean next-token loss over `blocks` (every block the same length: a plain mean of the batch means)."""
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = blocks[i:i + batch_size]
            total += model(input_ids=x, labels=x).loss.item() * len(x)
    model.train(was_training)
    return total / len(blocks)


def _eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train_loop(model, blocks, p: DictConfig, seed: int) -> dict:
    """AdamW over random batches of `blocks` (epoch by epoch, the order drawn from `seed`), linear warm-up and cosine
    decay to 10 % of `p.lr`, gradients clipped at `p.max_grad_norm`. A progress line every few seconds."""
    import torch

    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=(0.9, 0.95), eps=1e-8)
    steps, warmup = int(p.steps), int(p.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(blocks), generator=gen), 0
    batch = min(int(p.batch_size), len(blocks))
    model.train()
    start = last_print = time.perf_counter()
    losses: list[float] = []
    for step in range(1, steps + 1):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        x = blocks[order[cursor:cursor + batch]]
        cursor += batch
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        now = time.perf_counter()
        if now - last_print >= PROGRESS_EVERY_S or step == steps:
            last_print, per_step = now, (now - start) / step
            recent = losses[-20:]
            log.info("pretrain step %d/%d  loss %.3f  %s tokens/s  ETA %s", step, steps, sum(recent) / len(recent),
                     f"{step * x.numel() / (now - start):,.0f}", _eta(per_step * (steps - step)))
    seconds = time.perf_counter() - start
    tail = losses[-20:]
    return {"train_s": round(seconds, 1), "tokens_per_s": round(steps * batch * blocks.shape[1] / seconds),
            "train_tokens_seen": steps * batch * blocks.shape[1], "final_train_loss": round(sum(tail) / len(tail), 4)}


# ---- the build ----------------------------------------------------------------------------------------------------
def build_pretrained(model_cfg: DictConfig, path: Path, cache_dir: str, rows_file: Path) -> Path:
    """Build (once; other processes asking for it meanwhile wait for it) and return the pretrained base at `path`:
    written into a temporary folder beside it, then moved there with os.replace."""
    from qlora_exp.models import _is_built

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: a second trial of the sweep waits, then loads it
        if _is_built(path):
            return path
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            _build(model_cfg, tmp, path, cache_dir, rows_file)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written build is never left in the cache
            raise
    return path


def _build(model_cfg: DictConfig, tmp: Path, path: Path, cache_dir: str, rows_file: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    p = model_cfg.pretrain
    shape = OmegaConf.to_container(model_cfg.shape, resolve=True)
    corpus, sha = load_corpus(model_cfg, cache_dir, rows_file)
    tok = build_pretrain_tokenizer(model_cfg, tmp, cache_dir, rows_file)
    train = pack(tok, corpus["train"], int(p.seq_len))
    heldout = pack(tok, corpus["heldout"], int(p.seq_len), max_blocks=HELDOUT_BLOCKS)
    if len(train) == 0 or len(heldout) == 0:
        from qlora_exp.errors import ConfigError

        raise ConfigError("model.pretrain.max_chars", p.max_chars, f"a corpus large enough for a block of "
                          f"{p.seq_len} tokens to train on and one held out ({len(train)} and {len(heldout)})")
    config = AutoConfig.for_model(model_cfg.architecture, **shape, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(model_cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # on the CPU, wherever it runs
    log.info("pretraining %s (%.2fM parameters) on %s training tokens (%d blocks of %d), %d steps of %d blocks, "
             "into %s", model_cfg.name, sum(t.numel() for t in model.parameters()) / 1e6, f"{train.numel():,}",
             len(train), p.seq_len, p.steps, p.batch_size, path)
    init_loss = mean_loss(model, heldout)
    stats = train_loop(model, train, p, int(model_cfg.seed))
    heldout_loss = mean_loss(model, heldout)
    model.save_pretrained(tmp, safe_serialization=True)
    import transformers

    record = {"settings": OmegaConf.to_container(p, resolve=True), "shape": shape, "seed": model_cfg.seed,
              "corpus_sha1": sha, "corpus_documents": len(corpus["train"]), "heldout_documents": len(corpus["heldout"]),
              "corpus_chars": sum(map(len, corpus["train"] + corpus["heldout"])), "train_tokens": train.numel(),
              "heldout_tokens": heldout.numel(), "heldout_loss_at_init": round(init_loss, 4),
              "heldout_loss": round(heldout_loss, 4), **stats, "build_s": round(time.perf_counter() - start, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
              "python": sys.version.split()[0]}
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("pretrained in %.0f s: held-out loss %.3f (%.3f at init), saved with its tokenizer", record["build_s"],
             heldout_loss, init_loss)


def build_pretrain_tokenizer(model_cfg: DictConfig, folder: Path, cache_dir: str, rows_file: Path):
    """The build's tokenizer, saved into `folder`: `pretrain.tokenizer: shipped` is tiny's own (trained on the shipped
    rows alone), `corpus` one of the same vocabulary size trained on the shipped rows and the pretraining corpus."""
    from qlora_exp.models import build_tokenizer

    vocab = min(int(model_cfg.shape.vocab_size), 512)
    if model_cfg.pretrain.get("tokenizer", "shipped") == "shipped":
        return build_tokenizer(folder, rows_file, vocab)
    corpus, _ = load_corpus(model_cfg, cache_dir, rows_file)
    return build_tokenizer(folder, rows_file, vocab, extra_texts=corpus["train"])


def heldout_blocks(model_cfg: DictConfig, cache_dir: str, rows_file: Path, tokenizer, max_blocks=HELDOUT_BLOCKS):
    """The held-out stdlib blocks a build's held-out loss is measured on (for a test, or another model's loss)."""
    corpus, _ = load_corpus(model_cfg, cache_dir, rows_file)
    return pack(tokenizer, corpus["heldout"], int(model_cfg.pretrain.seq_len), max_blocks=max_blocks)


# ---- python -m qlora_exp.pretrain -------------------------------------------------------------------------------
def main(argv=None) -> Path:
    """Compose the config (model=tiny_pretrained unless an override names another model), check it, build."""
    from hydra import compose, initialize_config_dir

    from qlora_exp.errors import ConfigError
    from qlora_exp.models import random_model_dir, tokenizer_corpus
    from qlora_exp.validate import check_pretrain

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return None
    overrides = argv if any(a.split("=", 1)[0] == "model" for a in argv) else ["model=tiny_pretrained", *argv]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # (save_pretrained's bar of one shard)
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    try:
        if not cfg.model.get("pretrain"):
            raise ConfigError("model.pretrain", None, "a pretraining block (model=tiny_pretrained has one)")
        check_pretrain(cfg.model)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    path = random_model_dir(cfg.model, cfg.paths.cache_dir, tokenizer_corpus(cfg.paths), cfg.quantization)
    record = json.loads((path / "pretrain.json").read_text())
    print(f"{path}  (held-out loss {record['heldout_loss']:.3f}, {record['heldout_loss_at_init']:.3f} at init; "
          f"built in {record['build_s']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
