"""Measure a Trainer run the same way on every side of a benchmark.

`TrainingProbe.attach(trainer)` wraps the trainer's `get_batch_samples` (time spent waiting for
data, token counts of each batch) and adds a callback (step times, first-step loss, peak memory).
Runs use no gradient accumulation: batch k is step k.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from llava_tiny.model import unwrap_model

IGNORE_INDEX = -100

# Dense bf16 tensor-core peaks (FLOP/s) used for MFU; --peak-tflops overrides.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
PCIE_H100_BF16_FLOPS = 756e12


def peak_flops(override_tflops: float | None = None) -> float | None:
    """The accelerator's peak bf16 FLOP/s (None on a CPU or an unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name())


def peak_flops_for(name: str) -> float | None:
    """Peak by whole words of the device name ("NVIDIA L40" is not an L4, an A10G not an A10)."""
    words = name.upper().replace("-", " ").split()
    if "H100" in words and "PCIE" in words:
        return PCIE_H100_BF16_FLOPS
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in words), None)


def reset_peak_memory() -> str:
    """Start a new peak: CUDA's allocator peak, or the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs). Returns what is measured: 'cuda', 'rss' or 'rss_since_start'."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "cuda"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "rss"
    except OSError:  # not Linux, or not allowed: the peak then includes model loading
        return "rss_since_start"


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class BatchStats:
    samples: int
    images: int
    real_tokens: int  # the samples' own tokens
    computed_tokens: int  # positions the model runs (real + padding)
    supervised_tokens: int  # tokens with a training target (a sample's first token never has one)


def batch_stats(batch: dict) -> BatchStats:
    """Counts of a collated batch, as the main process receives it (whatever the loader workers).

    Real tokens are the `attention_mask` of a padded batch, or the `packed_segments` of a packed one.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    segments = [segment for row in batch.get("packed_segments", []) for segment in row]
    if "attention_mask" in batch:
        real = int(batch["attention_mask"].sum())
    elif segments:
        real = sum(end - start for start, end in segments)
    else:
        real = input_ids.numel()
    samples = len(segments) if segments else input_ids.shape[0]
    return BatchStats(samples=samples, images=batch["pixel_values"].shape[0] if "pixel_values" in batch else 0,
                      real_tokens=real, computed_tokens=input_ids.numel(),
                      supervised_tokens=int((labels[..., 1:] != IGNORE_INDEX).sum()))


class TurnTaking:
    """Steps of several benchmark processes, one at a time, in a ring of pipes.

    On a shared machine the background load changes from minute to minute; when sides alternate
    step by step they all see the same load, and each side's time counts only its own steps.
    A side waits for a byte before a step and hands one on after it; a closed pipe (the previous
    side has finished) ends the waiting.
    """

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd, self.open = read_fd, write_fd, True

    def wait(self) -> None:
        if self.open and not os.read(self.read_fd, 1):
            self.open = False

    def pass_on(self) -> None:
        try:
            os.write(self.write_fd, b"t")
        except BrokenPipeError:  # the next side has finished
            pass

    def close(self) -> None:
        os.close(self.write_fd)


@dataclass
class TrainingProbe(TrainerCallback):
    """Step times, data waits, token counts and peak memory of one training run.

    A step's time runs from the start of its data fetch to the end of its optimizer step (on a
    GPU after a synchronize; the Trainer's NaN check syncs every step anyway).
    """

    warmup_steps: int
    window_steps: int
    turns: TurnTaking | None = None
    batches: list[BatchStats] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads)
    data_wait: list[float] = field(default_factory=list)
    first_loss: float | None = None
    memory_kind: str = ""
    peak_memory: int = 0
    _step_start: float = 0.0
    _step_cpu_start: float = 0.0

    def attach(self, trainer) -> None:
        fetch = trainer.get_batch_samples

        def timed_fetch(*args, **kwargs):
            if self.turns is not None:
                self.turns.wait()
            self._step_start, self._step_cpu_start = time.perf_counter(), time.process_time()
            batches, num_items = fetch(*args, **kwargs)
            self.data_wait.append(time.perf_counter() - self._step_start)
            self.batches += [batch_stats(batch) for batch in batches]
            return batches, num_items

        trainer.get_batch_samples = timed_fetch
        trainer.add_callback(self)

    # --- callback ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.memory_kind = reset_peak_memory()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.step_cpu_seconds.append(time.process_time() - self._step_cpu_start)
        if self.turns is not None:
            self.turns.pass_on()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.first_loss is None and logs and "loss" in logs:
            self.first_loss = float(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_memory = peak_memory_bytes()
        if self.turns is not None:
            self.turns.wait()  # until every side has stepped: saving and exiting would slow their last steps
            self.turns.close()

    # --- results -------------------------------------------------------------------------
    def windows(self) -> list[tuple[int, int]]:
        """(first step, end step) of each full timed window after the warm-up."""
        steps = len(self.step_seconds)
        return [(s, s + self.window_steps) for s in range(self.warmup_steps, steps - self.window_steps + 1,
                                                          self.window_steps)]

    def summary(self, flops_per_batch=None, peak: float | None = None) -> dict:
        """Medians over the timed windows; totals over the same steps."""
        rates = {"tokens": [], "samples": [], "mfu": []}
        timed = []
        for start, end in self.windows():
            seconds = sum(self.step_seconds[start:end])
            batches = self.batches[start:end]
            timed += batches
            rates["tokens"].append(sum(b.supervised_tokens for b in batches) / seconds)
            rates["samples"].append(sum(b.samples for b in batches) / seconds)
            if flops_per_batch is not None and peak:
                rates["mfu"].append(sum(flops_per_batch(b) for b in batches) / seconds / peak)
        if not timed:
            raise RuntimeError(f"no complete timed window: {len(self.step_seconds)} steps ran, "
                               f"{self.warmup_steps} warm-up + windows of {self.window_steps} needed")
        first, last = self.windows()[0][0], self.windows()[-1][1]
        timed_seconds = sum(self.step_seconds[first:last])
        computed = sum(b.computed_tokens for b in timed)
        return {
            "supervised_tokens_per_s": statistics.median(rates["tokens"]),
            "samples_per_s": statistics.median(rates["samples"]),
            "window_supervised_tokens_per_s": rates["tokens"],
            "window_samples_per_s": rates["samples"],
            "mean_supervised_tokens_per_s": sum(b.supervised_tokens for b in timed) / timed_seconds,
            "step_seconds": self.step_seconds[first:last],
            "step_cpu_seconds": self.step_cpu_seconds[first:last],
            "step_supervised_tokens": [b.supervised_tokens for b in timed],
            "padding_fraction": (computed - sum(b.real_tokens for b in timed)) / computed,
            "computed_tokens_per_step": computed / len(timed),
            "supervised_tokens_per_step": sum(b.supervised_tokens for b in timed) / len(timed),
            "samples_per_step": sum(b.samples for b in timed) / len(timed),
            "data_wait_s_per_step": statistics.median(self.data_wait[first:last]),
            "data_wait_fraction": sum(self.data_wait[first:last]) / timed_seconds,
            "peak_memory_bytes": self.peak_memory,
            "peak_memory_kind": self.memory_kind,
            "mfu": statistics.median(rates["mfu"]) if rates["mfu"] else None,
            "first_step_loss": self.first_loss,
            "timed_steps": len(timed),
            "warmup_steps": self.warmup_steps,
            "interleaved": self.turns is not None,
        }


def model_flop_counts(model) -> dict[str, int]:
    """Parameter counts behind the MFU formula: LLM without its input embeddings (a lookup, no
    FLOPs; lm_head is kept), vision tower, projector."""
    llava = unwrap_model(model)
    inner = llava.model

    def count(module):
        return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

    embeddings = inner.language_model.get_input_embeddings().weight
    lm_head = llava.lm_head.weight.numel() if llava.lm_head.weight is not embeddings else 0  # tied: counted once
    vision = llava.config.vision_config
    return {"llm": count(inner.language_model) - embeddings.numel() + lm_head, "tower": count(inner.vision_tower),
            "projector": count(inner.multi_modal_projector), "image_tokens": llava.config.image_seq_length,
            "tower_positions": (vision.image_size // vision.patch_size) ** 2 + 1}


MFU_FORMULA = ("6*N_llm*T_real + 2*N_tower*(images*tower_positions) + 6*N_projector*(images*image_tokens), "
               "T_real = non-padding tokens; N_llm without input embeddings")


def flops_per_batch_fn(counts: dict[str, int]):
    """FLOPs of one training step for MFU: LLM forward+backward (6NT) on the real (non-padding)
    tokens, frozen tower forward only (2NT), projector forward+backward."""

    def flops(batch: BatchStats) -> float:
        return (6 * counts["llm"] * batch.real_tokens
                + 2 * counts["tower"] * batch.images * counts["tower_positions"]
                + 6 * counts["projector"] * batch.images * counts["image_tokens"])

    return flops


def add_common_arguments(parser, quick_help: str, smoke_help: str) -> None:
    """The flags both benchmarks share: the mode, --out, and CPU threads."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--gpu-shapes", action="store_true",
                        help="TinyLlama-1.1B + CLIP ViT-L/14-336 shapes, random weights (for a GPU machine)")
    parser.add_argument("--out", help="write every figure to this JSON file")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per side (default 1: on a small shared CPU a second thread makes tiny "
                             "models several times slower and the ratio unstable; both sides get the same)")


def mode_of(args) -> str:
    return "gpu" if args.gpu_shapes else "smoke" if args.smoke else "quick" if args.quick else "full"


def use_cpu_threads(threads: int) -> None:
    """Both sides (and their child processes) compute on `threads` CPU threads; nothing changes on a GPU."""
    if not torch.cuda.is_available():
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def environment() -> dict:
    """Where the figures were measured."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = "cpu"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info
