"""No hub call at run time: bitsandbytes' CPU backend asks the Hugging Face hub for a prebuilt kernel
(`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`) as it is imported on a CPU with AVX512-BF16;
a trial imports it through qlora_exp.quiet.import_bitsandbytes, which makes that lookup fail at once. A fake
`kernels` package, first on PYTHONPATH, records every call it gets."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

FAKE_KERNELS = '''
# the installed kernels package (transformers imports its names), its get_kernel recording each call and fetching
# nothing
import importlib.machinery
import os
import sys

_fake_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_real = importlib.machinery.PathFinder.find_spec(
    "kernels", [p for p in sys.path if os.path.abspath(p or ".") != _fake_root])
__path__ = list(_real.submodule_search_locations)  # its submodules come from the real package
with open(_real.origin) as _f:
    exec(compile(_f.read(), _real.origin, "exec"))


def get_kernel(repo_id, *args, **kwargs):
    with open(os.environ["FAKE_KERNELS_RECORD"], "a") as f:
        f.write(repo_id + "\\n")
    raise RuntimeError("the fake kernels package fetches nothing")
'''


def fake_kernels_env(tmp_path: Path) -> dict:
    (tmp_path / "fake" / "kernels").mkdir(parents=True)
    (tmp_path / "fake" / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    path = os.pathsep.join([str(tmp_path / "fake"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "FAKE_KERNELS_RECORD": str(tmp_path / "calls.txt"),
            "TQDM_DISABLE": "1"}


def calls(tmp_path: Path) -> list[str]:
    record = tmp_path / "calls.txt"
    return record.read_text().split() if record.exists() else []


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_bitsandbytes_is_imported_without_asking_the_hub_for_its_cpu_kernel(tmp_path):
    env = fake_kernels_env(tmp_path)
    control = python("import bitsandbytes", env)  # bitsandbytes as anything else imports it
    assert control.returncode == 0, control.stderr[-2000:]
    if not calls(tmp_path):
        pytest.skip("bitsandbytes asks for no hub kernel on this CPU (no AVX512-BF16)")
    assert calls(tmp_path) == ["kernels-community/quantization-bitsandbytes"]
    (tmp_path / "calls.txt").unlink()

    guarded = python("""
        import json, sys, torch
        from qlora_exp.quiet import import_bitsandbytes
        import_bitsandbytes()
        import bitsandbytes.functional as F
        import kernels  # back for everything after: the fake package, not the hidden stand-in
        w = torch.randn(64, 64)
        q, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
        back = F.dequantize_4bit(q, state)
        print(json.dumps({"kernels": kernels.__file__, "error": (back - w).abs().mean().item(),
                          "scale": w.abs().mean().item()}))
    """, env)
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    out = json.loads(guarded.stdout.splitlines()[-1])
    assert calls(tmp_path) == []
    assert out["kernels"] == str(tmp_path / "fake" / "kernels" / "__init__.py")
    assert out["error"] < 0.15 * out["scale"]  # NF4 still round-trips: bitsandbytes' own CPU kernel works


@pytest.mark.slow
def test_a_trial_makes_no_hub_call(tmp_path, cache_dir):
    env = fake_kernels_env(tmp_path)
    proc = run_cli(["trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_adapter=false",
                    "data.max_train_rows=32", "data.max_eval_rows=8"], tmp_path, cache_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = (tmp_path / "outputs").rglob("metrics.json")
    result = json.loads(metrics.read_text())
    assert result["quantized"]["quant_type"] == "nf4" and result["steps"] == 2  # it did load bitsandbytes' 4-bit
    assert calls(tmp_path) == []
    assert "kernels-community" not in proc.stdout + proc.stderr  # the harmless line stays in the log file


def test_bitsandbytes_import_leaves_its_torch_compile_to_the_first_call():
    """bitsandbytes wraps four helpers in torch.compile as it is imported, which imports TorchDynamo and Inductor
    (2 s here); through import_bitsandbytes nothing is compiled until a helper is called, and torch.compile is torch's
    own again after the import."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, sys, torch
        compile_before = torch.compile
        from qlora_exp.quiet import import_bitsandbytes
        import_bitsandbytes()
        from bitsandbytes.backends.default import ops
        print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "restored": torch.compile is compile_before,
                          "helper": ops._dequantize_4bit_compute.__name__}))
    """)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"dynamo": False, "restored": True,
                                                       "helper": "_dequantize_4bit_compute"}


def test_a_deferred_compile_happens_once_with_the_same_arguments():
    from qlora_exp.quiet import _compile_on_first_call

    made = []

    def compile_now(fn, **kwargs):
        made.append(kwargs)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    def double(x):
        return 2 * x

    lazy = _compile_on_first_call(compile_now)
    deferred, decorated = lazy(double, dynamic=False), lazy(dynamic=True)(double)
    assert made == []  # nothing compiled as the module is imported
    assert deferred(3) == ("compiled", 6) and deferred(4) == ("compiled", 8) and decorated(1) == ("compiled", 2)
    assert made == [{"dynamic": False}, {"dynamic": True}]  # once each, with what bitsandbytes asked for
    assert deferred.__name__ == "double"


def test_the_tests_own_process_imports_bitsandbytes_without_asking_the_hub(tmp_path):
    """tests/conftest.py, which every test process (pytest's, each xdist worker's) loads first, imports bitsandbytes
    through the guard: transformers imported before it brings bitsandbytes in unguarded (it looks for it)."""
    env = fake_kernels_env(tmp_path)
    control = python("import bitsandbytes", env)
    assert control.returncode == 0, control.stderr[-2000:]
    if not calls(tmp_path):
        pytest.skip("bitsandbytes asks for no hub kernel on this CPU (no AVX512-BF16)")
    (tmp_path / "calls.txt").unlink()
    loaded = python("import sys; import tests.conftest; print('bitsandbytes' in sys.modules)", env)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split()[-1] == "True" and calls(tmp_path) == [], (calls(tmp_path), loaded.stderr[-1500:])
