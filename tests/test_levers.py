"""The speed levers of issue #15 (docs/benchmarks.md measures them on the GPU): offloaded checkpoints
(trainer.offload_checkpoints), regional compilation (trainer.compile_layers) and the memory plan's count of what LoRA
dropout keeps. Here, on the CPU: each trains the same result as without it, and the plan counts what it saves."""
import pytest
import torch

from qlora_exp.memory import estimate_gb, plan_memory
from tests.conftest import FAST, compose_cfg
from tests.test_memory_plan import ARTICLE_8B, H200


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, counting the tensors it packed (what the checkpoint kept for the backward)."""
    packed = 0

    def __init__(self, pin_memory=False, device_type="cuda"):
        super().__init__(pin_memory, device_type)
        pack = self.pack_hook

        def counting(tensor):
            CountingSaveOnCpu.packed += 1
            return pack(tensor)
        self.pack_hook = counting


def test_offloaded_checkpoints_train_the_same_as_kept_ones(tmp_path, cache_dir, monkeypatch):
    """Every layer checkpointed, its input kept on the device, then the same trial with the inputs offloaded (on a
    warm base): the same eval loss, the offload really used (save_on_cpu packed the layers' inputs), and a trial
    after it is back on torch's own checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    def funcs():
        return {getattr(m, "_gradient_checkpointing_func", None) for m in recipe.WARM.base.model.modules()
                if isinstance(m, GradientCheckpointingLayer)}

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    recipe.forget_warm()
    ckpt = [*FAST, "trainer.gradient_checkpointing=true"]
    kept = run_trial(compose_cfg(tmp_path, [*ckpt, f"paths.output_dir={tmp_path}/a"], cache_dir))
    assert CountingSaveOnCpu.packed == 0 and recipe.offloaded_checkpoint not in funcs()
    off = run_trial(compose_cfg(tmp_path, [*ckpt, "trainer.offload_checkpoints=true", f"paths.output_dir={tmp_path}/b"],
                                cache_dir))
    assert off.warm_base and off.offload_checkpoints and not kept.offload_checkpoints
    assert CountingSaveOnCpu.packed >= off.steps * 2  # at least a layer input per micro-step, for each of 2+ layers
    assert abs(off.eval_loss - kept.eval_loss) < 1e-5, (kept.eval_loss, off.eval_loss)
    again = run_trial(compose_cfg(tmp_path, [*ckpt, f"paths.output_dir={tmp_path}/c"], cache_dir))
    assert recipe.offloaded_checkpoint not in funcs() and abs(again.eval_loss - kept.eval_loss) < 1e-5
    recipe.forget_warm()


def test_compiled_layers_train_the_same_and_a_later_trial_runs_eagerly(tmp_path, cache_dir, monkeypatch):
    """trainer.compile_layers: each layer's attention and MLP go through torch.compile (here with its `eager`
    backend: dynamo traces the LoRA-wrapped 4-bit projections, without the C++ build inductor needs on a CPU), train
    the same eval loss, and the next trial on the kept base without it runs the layers uncompiled."""
    from qlora_exp import recipe
    from qlora_exp.trial import run_trial

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **kw, backend="eager"))
    torch._dynamo.reset()
    recipe.forget_warm()
    plain = run_trial(compose_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/a"], cache_dir))
    compiled = run_trial(compose_cfg(tmp_path, [*FAST, "trainer.compile_layers=true", f"paths.output_dir={tmp_path}/b"],
                                     cache_dir))
    attn = [m for n, m in recipe.WARM.base.model.named_modules() if n.endswith("self_attn")]
    assert compiled.compile_layers and attn and all(m._compiled_call_impl is not None for m in attn)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0  # dynamo compiled graphs of the layers
    assert abs(compiled.eval_loss - plain.eval_loss) < 1e-4, (plain.eval_loss, compiled.eval_loss)
    after = run_trial(compose_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/c"], cache_dir))
    assert not after.compile_layers and all(m._compiled_call_impl is None for m in attn)
    assert abs(after.eval_loss - plain.eval_loss) < 1e-4
    recipe.forget_warm()
    torch._dynamo.reset()


def test_the_plan_counts_offloaded_inputs_and_dropout_free_adapters(make_cfg):
    """Offloaded, a checkpointed layer's input costs no GPU memory: the estimate falls by exactly those inputs (2
    bytes per token and hidden unit of each checkpointed layer, with the margin), and under 24 GiB the plan recomputes
    fewer layers. Without LoRA dropout the adapters keep no copies of their inputs: a lower estimate, less
    recomputation."""
    cfg = make_cfg(*ARTICLE_8B)
    h, t = cfg.model.shape.hidden_size, 8 * cfg.trainer.max_length
    saved = estimate_gb(cfg, 8, 32, fused=True) - estimate_gb(cfg, 8, 32, fused=True, offload=True)
    assert saved == pytest.approx(32 * 2 * h * t * 1.10 / 2**30, rel=1e-6)
    kept, off = plan_memory(cfg, H200, fused=True), plan_memory(cfg, H200, fused=True, offload=True)
    assert off.estimate_gb <= 24 and off.checkpointed_layers < kept.checkpointed_layers
    assert "offloaded" in off.note and "offloaded" not in kept.note

    no_dropout = make_cfg(*ARTICLE_8B, "lora.dropout=0")
    assert estimate_gb(no_dropout, 8, 0, fused=True) < estimate_gb(cfg, 8, 0, fused=True) * 0.8
    plan = plan_memory(no_dropout, H200, fused=True)
    assert plan.estimate_gb <= 24 and plan.checkpointed_layers < kept.checkpointed_layers


@pytest.mark.parametrize("override, key", [
    ("trainer.offload_checkpoints=cpu", "trainer.offload_checkpoints"),
    ("trainer.compile_layers=auto", "trainer.compile_layers"),
])
def test_bad_lever_values_are_refused(make_cfg, override, key):
    from qlora_exp.errors import ConfigError
    from qlora_exp.validate import check_config
    from tests.test_memory_plan import CPU

    with pytest.raises(ConfigError) as e:
        check_config(make_cfg(override), CPU)
    assert str(e.value).startswith(key + "=") and "\n" not in str(e.value)
