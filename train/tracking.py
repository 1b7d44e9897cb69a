"""What training measures and where it goes: MLflow (the recipe's store) and metrics.json.

Only the main process talks to MLflow. Every rank counts the tokens it trained on, so a DDP run can show that
each rank did its share.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path

from transformers import TrainerCallback

# MLflow's dataset digest column holds 36 characters; the full fingerprint goes into a param as well.
_DIGEST_LEN = 36


class TokenCounter:
    """Wraps the trainer's data collator (composition, not a subclass) to count the tokens each batch carries.

    It counts what the collator it wraps returns: it sits inside the token budget (train/budget.py), which pads
    the batch after counting, so budget padding is never counted as data.
    """

    def __init__(self, collator):
        self.collator = collator
        self.batches = 0
        self.tokens = 0  # input tokens that are not padding
        self.trained_tokens = 0  # tokens that carry loss (assistant tokens with assistant-only loss)
        # every batch's tokens in the order they were made: the data loader fetches a batch ahead, so a step's
        # tokens are its own batches in this order, not the count's growth during the step
        self.batch_tokens: list[int] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches += 1
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.tokens += tokens
        self.batch_tokens.append(tokens)
        labels = batch.get("labels")
        if labels is not None:
            self.trained_tokens += int((labels != -100).sum())
        return batch

    def reset(self) -> None:
        self.batches = self.tokens = self.trained_tokens = 0
        self.batch_tokens = []

    def state(self) -> dict:
        return {"batches": self.batches, "tokens": self.tokens, "trained_tokens": self.trained_tokens}


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger(TrainerCallback):
    """On every log: loss, lr, grad norm, tokens/s and peak memory to MLflow (main process) and to a history.
    Every optimizer step is timed, and with compiled layers what compiling cost (`timing()`)."""

    def __init__(self, run_id: str | None, counter: TokenCounter, device: str, world_size: int,
                 compiled: bool = False):
        self.run_id, self.counter, self.device, self.world_size = run_id, counter, device, world_size
        self.history: list[dict] = []
        self._last_time = None
        self._steps_at_last_log = 0
        self.tokens_per_s: list[float] = []
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []  # this rank's real (non-padding) input tokens of every step
        self._step_start = 0.0
        self._first_batch = 0
        self._compile_log = None
        self._frames_after_first_step = 0
        if compiled:
            from .compiling import CompileLog

            self._compile_log = CompileLog()

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_batch = len(self.counter.batch_tokens)
        if self._compile_log is not None:
            self._compile_log.start()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()  # the peak of training, not of loading the base
        self._sync()
        self._step_start = self._last_time = time.perf_counter()
        self._steps_at_last_log = 0

    def on_step_end(self, args, state, control, **kwargs):
        # from one step's end to the next: the whole step, its batch's collation and the optimizer included
        self._sync()
        now = time.perf_counter()
        self.step_seconds.append(now - self._step_start)
        first = self._first_batch + (len(self.step_seconds) - 1) * args.gradient_accumulation_steps
        self.step_tokens.append(sum(self.counter.batch_tokens[first:first + args.gradient_accumulation_steps]))
        self._step_start = now
        if len(self.step_seconds) == 1 and self._compile_log is not None:
            self._frames_after_first_step = self._compile_log.frames()

    def timing(self) -> dict:
        """Step times (the first, which compiles, apart), this rank's real tokens of every step and, with compiled
        layers, the compile's frames, recompiles and seconds. `compiles_after_first_step` is 0 when every step
        reused the first step's graphs."""
        from .compiling import step_summary

        out = {**step_summary(self.step_seconds), "step_tokens": self.step_tokens}
        if self._compile_log is not None:
            log = self._compile_log.summary()
            out.update({"compile_s": log["seconds"], "compile_frames": log["frames"],
                        "compiles_after_first_step": log["frames"] - self._frames_after_first_step,
                        "recompile_reasons": log["recompile_reasons"]})
        return out

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()  # step times of the GPU's work, not of the kernel launches

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if "loss" in metrics and self._last_time is not None:
            now = time.perf_counter()
            # the tokens of the steps since the last log; the other ranks see batches of the same shape: local
            # throughput times the world size
            tokens = sum(self.step_tokens[self._steps_at_last_log:])
            rate = tokens / max(now - self._last_time, 1e-9) * self.world_size
            self._last_time, self._steps_at_last_log = now, len(self.step_tokens)
            metrics["tokens_per_s"] = rate
            self.tokens_per_s.append(rate)
        metrics["peak_memory_mib"] = peak_memory_mib(self.device)
        if not state.is_world_process_zero:
            return
        self.history.append({"step": state.global_step, **metrics})
        if self.run_id:
            log_metrics(self.run_id, metrics, state.global_step)


def log_metrics(run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def start_run(recipe, resume_run_id: str | None, params: dict, clean_dir: Path, fingerprints: dict) -> str:
    """Open (or reopen, after a crash) the training run; log params and the dataset digests. Returns the run id."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    from workbench.tracking import setup_mlflow

    setup_mlflow(recipe)
    if resume_run_id is not None:
        try:
            mlflow.get_run(resume_run_id)
        except Exception:
            resume_run_id = None  # the store was reset; a fresh run is honest
    run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else f"{recipe.name}-train")
    if resume_run_id is None:
        mlflow.set_tags({"stage": "train", "recipe": recipe.name, "base_model": recipe.base_model.label})
        mlflow.log_params(params)
        for split, digest in sorted(fingerprints.items()):
            source = LocalArtifactDatasetSource(str(clean_dir / split))
            dataset = MetaDataset(source, name=f"{recipe.name}/clean/{split}", digest=str(digest)[:_DIGEST_LEN])
            context = "training" if split == "train" else "evaluation"
            mlflow.log_input(dataset, context=context)
            mlflow.log_param(f"data.{split}.fingerprint", digest)
    else:
        mlflow.set_tag("resumed", "true")
    return run.info.run_id


def finish_run(run_id: str, metrics: dict[str, float], artifacts: list[Path]) -> None:
    import mlflow

    final = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    mlflow.log_metrics(final, run_id=run_id)
    for path in artifacts:
        mlflow.log_artifact(str(path), run_id=run_id)
    mlflow.end_run()


def flatten_params(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten_params(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: str(value)[:6000]}


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="o", ms=3, label="train loss")
    base = [(h["step"], h["base_eval_loss"]) for h in history if "base_eval_loss" in h]
    if base:
        ax.plot(*zip(*base[-1:]), "^", color="grey", label="base eval loss")
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals[-1:]), "s", label="fine-tune eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
