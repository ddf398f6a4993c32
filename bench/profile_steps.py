"""A trial callback for benchmarks: profile a few optimizer steps with torch.profiler, write the top kernels.

    python -m qlora_exp ... +callbacks.profile._target_=bench.profile_steps.ProfileSteps \
        +callbacks.profile.out=/tmp/profile.txt          # from the repo root (bench/ on the import path)
"""
from transformers import TrainerCallback


class ProfileSteps(TrainerCallback):
    def __init__(self, out: str, start: int = 5, steps: int = 2, rows: int = 40):
        self.out, self.start, self.steps, self.rows = out, start, steps, rows
        self.prof = None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.start and self.prof is None:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.start + self.steps:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=self.rows, max_name_column_width=70)
            with open(self.out, "w") as f:
                f.write(f"steps {self.start}..{self.start + self.steps} (optimizer steps), sorted by {key}\n{table}\n")
            self.prof = None
