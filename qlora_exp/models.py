"""Base models and tokenizers: from the hub, from a local path, or built here with random weights.

A model with `random_init: true` is built from its `shape` with a fixed seed and saved (safetensors)
under `paths.cache_dir`, with a byte-level BPE tokenizer trained on the shipped tiny_instruct rows,
so every later trial loads it through the same `from_pretrained` + `BitsAndBytesConfig` path a hub
model takes; with a `pretrain:` block as well (model=tiny_pretrained), those random weights are then
pretrained here on the Python standard library's docstrings and comments (qlora_exp.pretrain).
Nothing here downloads unless `name_or_path` names a hub model.
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# ChatML-style template; the {% generation %} markers let trl train on assistant tokens only.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def torch_dtype(name: str, cuda_bf16: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def build_tokenizer(path: Path, corpus_file: Path, vocab_size: int, extra_texts=()):
    """Train a byte-level BPE on `corpus_file`'s text (and `extra_texts`, a pretraining corpus) and save it with a
    chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus_file) as f:
            for line in f:
                yield " ".join(str(v) for v in _strings(json.loads(line)))
        yield from extra_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + ["<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                 unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(path)
    return hf


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def tokenizer_corpus(paths: DictConfig) -> Path:
    """The rows a random-weight model's tokenizer is trained on: the shipped tiny_instruct training file."""
    return Path(paths.data_dir) / "tiny_instruct" / "train.jsonl"


def random_model_path(model_cfg: DictConfig, cache_dir: str, corpus_file: Path, quantization=None) -> Path:
    """Where the random-weight model of `model_cfg.shape` is (or will be) built; with `model.random_build:
    quantized`, its 4-bit build for `quantization` (a folder of its own: other weights, another format)."""
    shape = OmegaConf.to_container(model_cfg.shape, resolve=True)
    key = [model_cfg.architecture, shape, model_cfg.seed, corpus_file.name]
    name = model_cfg.name
    if model_cfg.get("pretrain"):  # pretrained here: also its settings and the corpus's sha1
        from qlora_exp.pretrain import pretrain_key

        key += pretrain_key(model_cfg, cache_dir, corpus_file)
    if quantized_build(model_cfg) and quantization is not None:  # (None: only its tokenizer is asked for)
        q = quantization
        key += [q.method, q.double_quant, q.quant_storage]
        name = f"{name}-{q.method}"
    key = json.dumps(key, sort_keys=True)
    return Path(cache_dir) / "models" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def quantized_build(model_cfg: DictConfig) -> bool:
    return bool(model_cfg.get("random_init")) and model_cfg.get("random_build", "full") == "quantized"


def _is_built(path: Path) -> bool:
    return (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()


def random_model_dir(model_cfg: DictConfig, cache_dir: str, corpus_file: Path, quantization=None) -> Path:
    """Build (once) and return the folder of a random-weight model of `model_cfg.shape` (`model.random_build:
    quantized`: straight into its 4-bit form, qlora_exp.quantized_build; a `model.pretrain` block: then pretrained
    on the stdlib's text, qlora_exp.pretrain)."""
    shape = OmegaConf.to_container(model_cfg.shape, resolve=True)
    path = random_model_path(model_cfg, cache_dir, corpus_file, quantization)
    if _is_built(path):
        return path
    check_build_fits(model_cfg, path.parent, quantized=quantized_build(model_cfg))
    if model_cfg.get("pretrain"):
        from qlora_exp.pretrain import build_pretrained

        return build_pretrained(model_cfg, path, cache_dir, corpus_file)
    log.info("building random-weight %s model (seed %d%s) in %s", model_cfg.name, model_cfg.seed,
             f", straight into {quantization.method}" if quantized_build(model_cfg) else "", path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        if quantized_build(model_cfg):
            return _build_quantized(model_cfg, shape, path, tmp, corpus_file, quantization)
        return _build(model_cfg, shape, path, tmp, corpus_file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written build is never left in the cache
        raise


def build_needs_gib(model_cfg: DictConfig, cuda: bool, quantized: bool = False) -> tuple[float, float]:
    """(parameters in billions, GiB of memory) a random-weight build of this shape takes: its weights in bf16 on a
    GPU, in fp32 on the CPU (the build's dtype), plus a GiB for the process; built quantized, its 4-bit size
    (quantized_size_gib, with the embeddings and head in the build's dtype) and its largest weight drawn whole."""
    model = meta_model(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    if not quantized:
        return params / 1e9, params * (2 if cuda else 4) / 2**30 + 1.0
    from qlora_exp.quantized_build import SHARD_BYTES

    largest = max(p.numel() for p in model.parameters())  # drawn whole (fp32 on a CPU), while a shard is filled
    return params / 1e9, (SHARD_BYTES + largest * (2 if cuda else 4) * 2) / 2**30 + 1.0


def available_gib(cuda: bool) -> float:
    """Memory this build may take: the GPU's free memory, or the machine's MemAvailable."""
    if cuda:
        import torch

        return torch.cuda.mem_get_info()[0] / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def check_build_fits(model_cfg: DictConfig, cache: Path, quantized: bool = False) -> None:
    """Refuse, in one line, a random-weight build this machine's memory or the cache's disk cannot hold (the 8B shape
    in fp32 on a 24 GiB CPU machine was killed for memory after a minute, its half-built folder left behind)."""
    import torch

    from qlora_exp.errors import ConfigError

    cuda = torch.cuda.is_available()
    billions, need = build_needs_gib(model_cfg, cuda, quantized)
    have = available_gib(cuda)
    where = "GPU memory free" if cuda else "memory available on this machine"
    if need > have and quantized:
        raise ConfigError("model.random_init", True, f"a shape this machine can build: {model_cfg.name} has "
                          f"{billions:.1f}B parameters, {need:.1f} GiB to build straight into 4 bits, and there is "
                          f"{have:.1f} GiB {where}")
    if need > have:
        raise ConfigError("model.random_init", True, f"a shape this machine can build: {model_cfg.name} has "
                          f"{billions:.1f}B parameters, {need:.1f} GiB to build in {'bf16' if cuda else 'fp32'}, and "
                          f"there is {have:.1f} GiB {where}; build it once on a GPU machine into paths.cache_dir "
                          f"(bf16: {billions * 1e9 * 2 / 2**30 + 1:.0f} GiB), or give model.name_or_path a saved model")
    cache.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(cache).free / 2**30
    weights = quantized_size_gib(model_cfg, "", other_bytes=2 if cuda else 4) if quantized else billions * 1e9 * (
        2 if cuda else 4) / 2**30
    if weights > disk:
        raise ConfigError("paths.cache_dir", str(cache), f"a folder with {weights:.1f} GiB free for the {model_cfg.name} "
                          f"random-weight build (it has {disk:.1f} GiB)")


def _build(model_cfg: DictConfig, shape: dict, path: Path, tmp: Path, corpus_file: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(tmp, corpus_file, min(shape["vocab_size"], 512))
    config = AutoConfig.for_model(model_cfg.architecture, **shape, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(model_cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":  # initialise 8B-scale weights on the GPU: minutes faster than on the CPU
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:  # not under `with torch.device("cpu")`: after it, CPU training in this process ran ~40x slower (torch 2.13)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # give the build's bf16 weights back before the quantized load
    _move_into_place(tmp, path)
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """`tmp` becomes `path`, unless another process finished the same build first: theirs is kept (rename refuses
    a non-empty folder), and ours goes."""
    try:
        tmp.rename(path)
    except OSError:
        if not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _build_quantized(model_cfg: DictConfig, shape: dict, path: Path, tmp: Path, corpus_file: Path,
                     quantization) -> Path:
    import torch
    from transformers import AutoConfig

    from qlora_exp.quantized_build import build_quantized

    tok = build_tokenizer(tmp, corpus_file, min(shape["vocab_size"], 512))
    config = AutoConfig.for_model(model_cfg.architecture, **shape, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    build_quantized(config, quantization, model_cfg.seed, tmp, "cuda" if torch.cuda.is_available() else "cpu")
    _move_into_place(tmp, path)
    return path


def meta_model(model_cfg: DictConfig):
    """The architecture on the meta device (no memory, no weights): for checking projection names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_cfg.architecture, **OmegaConf.to_container(model_cfg.shape, resolve=True))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def tokenizer_for_checks(model_cfg: DictConfig, cache_dir: str, corpus_file: Path):
    """The tokenizer a trial of `model_cfg` will use, with no model built, loaded or downloaded: a built random
    model's own, or one trained the same way (deterministic) in a temporary folder; a local folder's, or a hub
    model's from the local hub cache (OSError when it is not there: the trial downloads it)."""
    if model_cfg.random_init:
        path = random_model_path(model_cfg, cache_dir, corpus_file)
        if _is_built(path):
            return load_tokenizer(str(path), model_cfg)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if model_cfg.get("pretrain"):
                from qlora_exp.pretrain import build_pretrain_tokenizer

                return build_pretrain_tokenizer(model_cfg, Path(tmp), cache_dir, corpus_file)
            return build_tokenizer(Path(tmp), corpus_file, min(int(model_cfg.shape.vocab_size), 512))
    return load_tokenizer(str(model_cfg.name_or_path), model_cfg, local_files_only=True)


def load_tokenizer(source: str, model_cfg: DictConfig, local_files_only: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=model_cfg.revision, local_files_only=local_files_only,
                                        trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def load_base_model(source: str, model_cfg: DictConfig, quantization_config, dtype, device_map):
    """`from_pretrained` with safetensors only and no remote code unless the config asks for it."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                  use_safetensors=True, dtype=dtype)
    if quantization_config is not None:  # (None passed would also drop a saved 4-bit checkpoint's own config)
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


# ---- the quantized-base cache (quantization.cache=true) ----------------------------------------------------------
def quantized_base_path(cfg: DictConfig, source: str, compute_dtype) -> Path:
    """Where the base quantized for this trial is kept: keyed by the model (folder or hub id, revision), the
    quantization config and the bitsandbytes version whose format it is in."""
    import bitsandbytes
    import transformers

    q = cfg.quantization
    key = json.dumps([str(Path(source).resolve()) if Path(source).exists() else source, cfg.model.revision, q.method,
                      q.double_quant, str(compute_dtype), q.quant_storage, bitsandbytes.__version__,
                      transformers.__version__.rsplit(".", 1)[0]])
    name = Path(str(source).rstrip("/")).name.replace("/", "_")
    return Path(cfg.paths.cache_dir) / "quantized" / f"{name}-{q.method}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def quantized_size_gib(model_cfg: DictConfig, source: str, other_bytes: int = 2) -> float:
    """What the base takes on disk in 4 bits: linear weights at ~0.53 byte each (4 bits, their block constants),
    the rest (embeddings, norms, the LM head) at `other_bytes` (bf16). From the architecture on the meta device:
    nothing loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.random_init:
        model = meta_model(model_cfg)
    else:
        config = AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    total = sum(p.numel() for p in model.parameters())
    return (linear * 0.53 + (total - linear) * other_bytes) / 2**30


def load_quantized_base(cfg: DictConfig, source: str, quant, dtype, device_map, keep_layout) -> tuple[object, str]:
    """(the base, where it came from): from the quantized cache when this base was quantized before, else
    quantized from `source` and saved there (a bitsandbytes-serialized safetensors checkpoint that
    `from_pretrained` loads as it is), so every later trial of the sweep skips the quantization. A cache without
    the disk for it is refused in one line, before anything is loaded."""
    from qlora_exp.errors import ConfigError

    path = quantized_base_path(cfg, source, quant.bnb_4bit_compute_dtype)
    if _is_built(path):
        model = load_base_model(str(path), cfg.model, None, dtype, device_map)
        keep_layout(model)
        return model, f"loaded from the quantized cache {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    need, free = quantized_size_gib(cfg.model, source) * 1.1, shutil.disk_usage(path.parent).free / 2**30
    if need > free:
        raise ConfigError("quantization.cache", True, f"a cache folder with {need:.1f} GiB free for the quantized "
                          f"base ({path.parent} has {free:.1f} GiB): free some, move paths.cache_dir, or set "
                          "quantization.cache=false")
    model = load_base_model(source, cfg.model, quant, dtype, device_map)
    keep_layout(model)  # before any forward: the layout saved is the one training differentiates through
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, path)  # a folder another trial finished first stays (os.replace refuses a non-empty one)
    except OSError as e:
        if not _is_built(path):  # (another trial of the sweep saving the same base first is no failure)
            log.warning("the quantized base was not cached (%s): this trial goes on from the one it loaded", e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, f"quantized from {source} and saved to the quantized cache {path}"
