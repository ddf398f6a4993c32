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


def test_each_micro_batch_recomputes_only_the_layers_its_tokens_need(tmp_path, cache_dir, monkeypatch):
    """With the memory plan's token limits per depth (trainer.gradient_checkpointing=auto on a GPU), a micro-batch
    recomputes the fewest layers whose limit holds its tokens: here limits placed between the trial's own micro-batch
    sizes, so its micro-batches recompute 0 to 4 of the 4 layers. Each layer runs once more for each micro-batch
    that recomputed it (counted at the layer), metrics.json says the depths, and the result is the trial's without
    recomputation."""
    import json

    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_exp import memory, recipe
    from qlora_exp.trial import run_trial

    spies = []

    class Spy(recipe.recompute_by_tokens):  # counts each layer's MLP calls while they train (the layer's forward
        def __init__(self, model, table):  # is what transformers checkpoints: its own hooks stay outside)
            super().__init__(model, table)
            self.calls = [0] * len(self.layers)
            spies.append(self)
            for i, layer in enumerate(self.layers):
                layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: self._count(mod, i))

        def _count(self, mod, i):
            self.calls[i] += mod.training

    def trial(table, name):
        def plan(cfg, device, fused=False, offload=False):
            per_step = cfg.trainer.batch_size * cfg.trainer.grad_accum
            return memory.Plan(cfg.trainer.batch_size, per_step // cfg.trainer.batch_size, True, None, 1.0, 1.0,
                               "memory plan for the test", max_tokens=table)
        monkeypatch.setattr(recipe, "plan_memory", plan)
        return run_trial(compose_cfg(tmp_path, [*FAST, "trainer.batch_size=4", f"paths.output_dir={tmp_path}/{name}"],
                                     cache_dir))

    monkeypatch.setattr(recipe, "recompute_by_tokens", Spy)
    recipe.forget_warm()
    none = trial((10**9,), "none")  # every micro-batch within depth 0's limit
    sizes = sorted(t for t, _ in spies[0].seen)
    assert none.recomputed_layers["max"] == 0 and spies[0].calls == [len(sizes)] * 4
    assert none.largest_micro_batch_tokens == sizes[-1] and sizes[0] < sizes[-1]
    table = tuple(sizes[len(sizes) * k // 5] for k in range(4)) + (sizes[-1],)
    mixed = trial(table, "mixed")
    spy = spies[1]
    assert [t for t, _ in spy.seen] == [t for t, _ in spies[0].seen]  # the same data order
    depths = [memory.depth_for(t, table) for t, _ in spy.seen]
    assert [d for _, d in spy.seen] == depths and len(set(depths)) >= 3
    assert spy.calls == [len(depths) + sum(d > i for d in depths) for i in range(4)]
    written = json.loads((tmp_path / "mixed" / "metrics.json").read_text())["recomputed_layers"]
    assert written == {"min": min(depths), "mean": round(sum(depths) / len(depths), 2), "max": max(depths),
                       "micro_batches": len(depths)}
    assert abs(mixed.eval_loss - none.eval_loss) < 1e-5, (none.eval_loss, mixed.eval_loss)
    layers = [m for m in recipe.WARM.base.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.mlp._forward_pre_hooks.clear()
    recipe.forget_warm()


def test_the_plan_gives_each_depth_its_token_limit(make_cfg):
    """The plan's depth holds the worst micro-batch (8 x 1024 tokens at 24 GiB); for each smaller depth it gives the
    most tokens that fit the budget, so a micro-batch of the recipe's median size (8 rows of ~650) recomputes fewer
    layers. Only when the plan chooses the checkpointing and fits a GPU."""
    from qlora_exp.memory import depth_for
    from tests.test_memory_plan import CPU

    cfg = make_cfg(*ARTICLE_8B, "lora.dropout=0")
    plan = plan_memory(cfg, H200, fused=True)
    n, table = plan.checkpointed_layers, plan.max_tokens
    assert plan.micro_batch_size == 8 and len(table) == n + 1 and list(table[1:]) == sorted(table[1:])  # (one layer
    # recomputed costs more than none: its kept input and the layer being recomputed)
    assert table[n] >= 8 * 1024 > table[n - 1]
    for k, limit in enumerate(table):
        assert estimate_gb(cfg, 8, k, fused=True, tokens=limit) <= 24 < estimate_gb(cfg, 8, k, fused=True,
                                                                                    tokens=limit + 1)
    assert depth_for(8 * 1024, table) == n and depth_for(8 * 650, table) < n - 4 and depth_for(table[0], table) == 0
    assert f"at most {table[0]:,} tokens recomputes none" in plan.note
    assert plan_memory(make_cfg(*ARTICLE_8B, "trainer.gradient_checkpointing=true"), H200, fused=True).max_tokens is None
    assert plan_memory(make_cfg("trainer.micro_batch_size=auto", "trainer.gradient_checkpointing=auto"), CPU).max_tokens \
        is None


def test_auto_offloads_only_where_the_plan_finds_a_faster_step(make_cfg):
    """trainer.offload_checkpoints=auto: at 8 GiB offloading lets 8 examples go in one micro-batch instead of two of
    4 (measured on the H200: 1.88x), so the plan takes it; at 24 GiB it would save one recomputed layer for the
    copies' time (measured: 10 % slower), so the plan keeps the inputs; on a CPU there is nothing to plan."""
    from tests.test_memory_plan import CPU

    small = make_cfg(*ARTICLE_8B, "lora.dropout=0", "trainer.memory_budget_gb=8")
    auto, kept = plan_memory(small, H200, fused=True, offload="auto"), plan_memory(small, H200, fused=True)
    assert auto.offload and (auto.micro_batch_size, auto.grad_accum) == (8, 1) and "offloaded" in auto.note
    assert not kept.offload and kept.micro_batch_size < 8
    large = make_cfg(*ARTICLE_8B, "lora.dropout=0")
    auto, kept = plan_memory(large, H200, fused=True, offload="auto"), plan_memory(large, H200, fused=True)
    assert not auto.offload and (auto.micro_batch_size, auto.checkpointed_layers) == (kept.micro_batch_size,
                                                                                         kept.checkpointed_layers)
    cpu = plan_memory(make_cfg("trainer.micro_batch_size=auto", "trainer.gradient_checkpointing=auto",
                               "trainer.offload_checkpoints=auto"), CPU, offload="auto")
    assert not cpu.offload
