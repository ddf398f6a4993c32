"""Base models and tokenizers: from the hub, from a local path, or built here with random weights.

A model with `random_init: true` is built from its `shape` with a fixed seed and saved (safetensors)
under `paths.cache_dir`, with a byte-level BPE tokenizer trained on the shipped tiny_instruct rows,
so every later trial loads it through the same `from_pretrained` + `BitsAndBytesConfig` path a hub
model takes. Nothing here downloads unless `name_or_path` names a hub model.
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


def build_tokenizer(path: Path, corpus_file: Path, vocab_size: int):
    """Train a byte-level BPE on `corpus_file`'s text and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus_file) as f:
            for line in f:
                yield " ".join(str(v) for v in _strings(json.loads(line)))

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


def random_model_path(model_cfg: DictConfig, cache_dir: str, corpus_file: Path) -> Path:
    """Where the random-weight model of `model_cfg.shape` is (or will be) built."""
    shape = OmegaConf.to_container(model_cfg.shape, resolve=True)
    key = json.dumps([model_cfg.architecture, shape, model_cfg.seed, corpus_file.name], sort_keys=True)
    return Path(cache_dir) / "models" / f"{model_cfg.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _is_built(path: Path) -> bool:
    return (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()


def random_model_dir(model_cfg: DictConfig, cache_dir: str, corpus_file: Path) -> Path:
    """Build (once) and return the folder of a random-weight model of `model_cfg.shape`."""
    shape = OmegaConf.to_container(model_cfg.shape, resolve=True)
    path = random_model_path(model_cfg, cache_dir, corpus_file)
    if _is_built(path):
        return path
    check_build_fits(model_cfg, path.parent)
    log.info("building random-weight %s model (seed %d) in %s", model_cfg.name, model_cfg.seed, path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        return _build(model_cfg, shape, path, tmp, corpus_file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written build is never left in the cache
        raise


def build_needs_gib(model_cfg: DictConfig, cuda: bool) -> tuple[float, float]:
    """(parameters in billions, GiB of memory) a random-weight build of this shape takes: its weights in bf16 on a
    GPU, in fp32 on the CPU (the build's dtype), plus a GiB for the process."""
    params = sum(p.numel() for p in meta_model(model_cfg).parameters())
    return params / 1e9, params * (2 if cuda else 4) / 2**30 + 1.0


def available_gib(cuda: bool) -> float:
    """Memory this build may take: the GPU's free memory, or the machine's MemAvailable."""
    if cuda:
        import torch

        return torch.cuda.mem_get_info()[0] / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def check_build_fits(model_cfg: DictConfig, cache: Path) -> None:
    """Refuse, in one line, a random-weight build this machine's memory or the cache's disk cannot hold (the 8B shape
    in fp32 on a 24 GiB CPU machine was killed for memory after a minute, its half-built folder left behind)."""
    import torch

    from qlora_exp.errors import ConfigError

    cuda = torch.cuda.is_available()
    billions, need = build_needs_gib(model_cfg, cuda)
    have = available_gib(cuda)
    where = "GPU memory free" if cuda else "memory available on this machine"
    if need > have:
        raise ConfigError("model.random_init", True, f"a shape this machine can build: {model_cfg.name} has "
                          f"{billions:.1f}B parameters, {need:.1f} GiB to build in {'bf16' if cuda else 'fp32'}, and "
                          f"there is {have:.1f} GiB {where}; build it once on a GPU machine into paths.cache_dir "
                          f"(bf16: {billions * 1e9 * 2 / 2**30 + 1:.0f} GiB), or give model.name_or_path a saved model")
    cache.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(cache).free / 2**30
    weights = billions * 1e9 * (2 if cuda else 4) / 2**30
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
    if path.exists():  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(path)
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
                  use_safetensors=True, dtype=dtype, quantization_config=quantization_config)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)
