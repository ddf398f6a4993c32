"""Merge a trial's LoRA adapter into its (unquantized) base and save a standalone model.

    python -m qlora_exp.merge outputs/runs/<time>                  # -> <run>/merged (bf16 on GPU, fp32 on CPU)
    python -m qlora_exp.merge outputs/multirun/<sweep>/3 --dtype bfloat16 --out /models/mine

The base is loaded unquantized (merging into 4-bit weights would round the update away), the adapter
folded in with peft's `merge_and_unload`, and the result saved as safetensors with the tokenizer.
"""
import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                  trust_remote_code: bool = False) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter={str(adapter_dir)!r} has no adapter_config.json: "
                                "give a trial folder or its adapter/ folder")
    base = json.loads(config_file.read_text())["base_model_name_or_path"]
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    log.info("merged %s into %s (%s): %s", adapter_dir, base, dtype, out_dir)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qlora_exp.merge", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trial folder (holding adapter/) or an adapter folder")
    ap.add_argument("--out", help="where to save the merged model (default: <run>/merged)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    ap.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    a = ap.parse_args(argv)
    run = Path(a.run)
    adapter = run / "adapter" if (run / "adapter").is_dir() else run
    out = Path(a.out) if a.out else (run if adapter != run else run.parent) / "merged"
    if out.exists() and any(out.iterdir()) and not a.overwrite:  # before any model is loaded
        raise SystemExit(f"error: --out={str(out)!r} is not accepted: an empty or new folder ({out} already holds "
                         f"{sum(1 for _ in out.iterdir())} entries: another --out, or --overwrite to replace them)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        merge_adapter(adapter, out, a.dtype, a.trust_remote_code)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(out)


if __name__ == "__main__":
    main()
