"""Pre-training under DeepSpeed: the loop, the step and evaluation.

Launch with any of::

    deepspeed --num_gpus 8 run_pretrain.py --data-prefix data/wiki --save runs/base --recipe base
    torchrun --nproc_per_node 8 run_pretrain.py ...
    srun python run_pretrain.py ...          (one task per GPU)
    mpirun -np 8 python run_pretrain.py ...

The rest of a run lives next door: its configuration and command line in ``config.py`` (validated before the
distributed start-up), the DeepSpeed engine in ``engine.py``, checkpoints and resume in ``checkpoint.py``,
metrics and log lines in ``metrics.py``, signals in ``signals.py``. The resolved configuration is logged,
written to ``RUN_DIR/config.json`` and saved in every checkpoint.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Sequence

from pipeline.errors import ConfigError, PipelineError
from pipeline.training.config import ResolvedConfig, build_parser, resolve_config
from pipeline.training.metrics import KIND_LABELS, MetricsSink, log, safe_exp, setup_logging
from pipeline.training.signals import (PAUSE_AFTER_STEP_ENV, PAUSE_IN_SAVE_ENV, StopSignal,
                                       ignore_late_preemption_warning, ignore_stop_signals_in_worker,
                                       pause_seconds)

STOPPED_BY_SIGNAL_FILE = "stopped_by_signal"
CONFIG_FILE = "config.json"


class AgreedError(PipelineError):
    """An error every rank raises at once (agreed over the ranks): rank 0 reports it, the others exit quietly."""


class Trainer:
    """One training run on this rank (all ranks build one and step it in lockstep)."""

    def __init__(self, config: ResolvedConfig):
        import torch
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator
        from megatron.core import parallel_state

        from model import build_model
        from model.parallel import initialize_model_parallel
        from pipeline.training.config import precision_of
        from pipeline.training.device import check_device
        from pipeline.training.distributed import control_group, init_distributed
        from pipeline.training.engine import build_engine

        self.stop_signal = StopSignal()
        self.launch = init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_rank0 = self.rank == 0
        setup_logging(self.rank)
        self.control_group = control_group()
        accelerator = get_accelerator()
        self.device = (torch.device(accelerator.device_name(), accelerator.current_device())
                       if accelerator.device_name() != "cpu" else torch.device("cpu"))

        config.launch = self.launch.to_dict()
        self.config = cfg = config
        # The GPU's compute capability and SDPA kernel; bf16 refused on a GPU without it (V100).
        for line in check_device(accelerator.device_name(), precision_of(cfg.deepspeed),
                                 cfg.runtime.deepspeed_config, cfg.runtime.compile != "none"):
            log.info(line)
        self.run_dir = Path(cfg.runtime.save) if cfg.runtime.save else None
        initialize_model_parallel(cfg.tensor_parallel_size, cfg.training.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()

        # The resume point and its compatibility are settled before anything heavy is built.
        self.resume = None
        if cfg.runtime.load:
            self.resume = self._find_and_check_resume_point(cfg.runtime.load)
        elif self.run_dir is not None:
            from pipeline.training.checkpoint import checkpoints_dir, complete_tags
            if complete_tags(checkpoints_dir(self.run_dir)):
                raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --load {self.run_dir} to resume "
                                  "or choose another --save directory")

        model = build_model(cfg.model, init_seed=cfg.training.seed)
        self.engine = build_engine(model, cfg.training, cfg.deepspeed, compile=cfg.runtime.compile,
                                   log=log.info)
        self.step = 0
        self.consumed_samples = 0
        self.rng_states_to_restore = None
        if self.resume is not None:
            self._load_checkpoint()

        from pipeline.training.flops import MFU_FWD_BWD_FACTOR, training_flops

        # Model FLOPs per optimizer step for the TFLOP/s and MFU logs (forward + 2x backward).
        self.flops_per_step = float(training_flops(cfg.model, cfg.training.global_batch_size, cfg.training.seq_len,
                                                   cfg.masking.rate, mask_fraction=cfg.masking.fractions[0],
                                                   fwd_bwd_factor=MFU_FWD_BWD_FACTOR))
        self._build_data()
        self._open_logs()

    # --- resume ----------------------------------------------------------------------------------------
    def _find_and_check_resume_point(self, load_path: str):
        import torch.distributed as dist

        from pipeline.io import canonical_json_sha256
        from pipeline.training.checkpoint import (CheckpointError, find_resume_point, read_run_config,
                                                  resume_differences)

        # Rank 0 verifies the checkpoint files once and tells the others which tag to load, instead of every
        # rank of every node re-reading the whole checkpoint. Any failure there is sent too: a rank that
        # raised alone would leave the others waiting in the broadcast.
        choice: list = [None]
        if self.is_rank0:
            try:
                choice[0] = ("ok", find_resume_point(load_path))
            except (PipelineError, OSError) as error:
                from pipeline.errors import one_line
                choice[0] = ("error", one_line(error))
        dist.broadcast_object_list(choice, src=0, group=self.control_group)
        status, point = choice[0]
        if status == "error":
            raise CheckpointError(point)
        if point is None:
            log.info(f"no checkpoint under {load_path}; starting from scratch")
            return None
        for reason in point.skipped:
            log.warning(f"warning: skipping damaged checkpoint: {reason}")
        saved = read_run_config(point.tag_dir)
        current = self.config.to_dict()
        notices, refusals = resume_differences(saved["config"], current)
        if saved.get("dataset_fingerprint") != canonical_json_sha256(self.config.dataset_meta):
            refusals.append("dataset: meta.json differs from the checkpoint's (another dataset or tokenizer)")
        if refusals:
            raise CheckpointError(f"refusing to resume from {point.tag_dir}: incompatible configuration: "
                                  + "; ".join(refusals))
        if notices:
            log.info("note: resuming with changed implementation settings (each optimizer step still takes the "
                     "same samples; the loss is averaged per micro batch and summed in another order, so the run "
                     "continues close to, not bitwise like, the original): " + "; ".join(notices))
        if saved["config"]["training"]["train_steps"] != current["training"]["train_steps"]:
            log.info(f"note: train_steps changed from {saved['config']['training']['train_steps']} to "
                     f"{current['training']['train_steps']}; the LR schedule follows the new horizon")
        return point

    def _load_checkpoint(self):
        from pipeline.training.checkpoint import CheckpointError, load_checkpoint

        point = self.resume
        client_state = load_checkpoint(self.engine, point)
        self.step = int(client_state["step"])
        self.consumed_samples = int(client_state["consumed_samples"])
        rng_states = client_state["rng_states"]
        if len(rng_states) != self.world_size:
            raise CheckpointError(f"{point.tag_dir}: saved by {len(rng_states)} ranks, now {self.world_size}")
        # Restored after the data loaders exist: building them may draw from the global generators.
        self.rng_states_to_restore = rng_states[self.rank]
        log.info(f"resumed from {point.tag_dir}: step {self.step}, {self.consumed_samples} samples consumed")

    # --- data ------------------------------------------------------------------------------------------
    def _fork_rng(self):
        import torch

        if self.device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(devices=[self.device.index], device_type=self.device.type)

    def _build_loader(self, split: str, consumed: int, total: int | None, source: str | None = None):
        """The loader of ``split``: the data prefix's corpus, a blend of corpora (train), or one ``source`` of
        a blend (validation is reported per source). Indices are built by one rank per node or per job
        (--index-builder) while the others wait at a barrier."""
        import torch.distributed as dist

        from pipeline.data.batch import SpecialTokens
        from pipeline.data.blend import build_blended_dataloader, parse_data_prefix
        from pipeline.data.dataset import build_pretraining_dataloader

        cfg = self.config
        special = SpecialTokens(**cfg.dataset_meta["special_tokens"])
        sources = parse_data_prefix(cfg.runtime.data_prefix)
        is_builder = self.rank == 0 if cfg.runtime.index_builder == "global" else self.launch.local_rank == 0
        shared = dict(is_index_builder=is_builder, barrier=lambda: dist.barrier(group=self.control_group),
                      index_dir=cfg.runtime.index_dir)
        with self._fork_rng():
            if len(sources) > 1 and source is None:
                loader = build_blended_dataloader(
                    sources, split, cfg.training.seq_len, cfg.masking, special, cfg.model.vocab_size,
                    cfg.training.micro_batch_size, self.dp_rank, cfg.data_parallel_size, consumed,
                    cfg.runtime.num_workers, cfg.training.seed, total, **shared)
            else:
                loader = build_pretraining_dataloader(
                    source or sources[0][1], split, cfg.training.seq_len, cfg.masking, special,
                    cfg.model.vocab_size, cfg.training.micro_batch_size, self.dp_rank, cfg.data_parallel_size,
                    consumed, cfg.runtime.num_workers, cfg.training.seed, total_samples=total, **shared)
        if cfg.runtime.num_workers > 0:
            loader.worker_init_fn = ignore_stop_signals_in_worker(loader.worker_init_fn)
        return loader

    def _build_data(self):
        from pipeline.data.blend import parse_data_prefix, source_name

        cfg = self.config
        total = cfg.training.train_steps * cfg.training.global_batch_size
        self.train_loader = self._build_loader("train", self.consumed_samples, max(total, self.consumed_samples))
        with self._fork_rng():
            self.train_iter = iter(self.train_loader)
        self.samples_per_epoch = _samples_per_epoch(self.train_loader)
        self.valid_loader = None
        if cfg.runtime.eval_interval > 0:
            eval_samples = cfg.runtime.eval_iters * cfg.training.micro_batch_size * cfg.data_parallel_size
            sources = parse_data_prefix(cfg.runtime.data_prefix)
            if len(sources) == 1:
                self.valid_loader = self._build_loader("valid", 0, eval_samples)
            else:  # one loader per source: validation is reported per source and blended by the weights
                self.valid_loader = {source_name(prefix): self._build_loader("valid", 0, eval_samples, prefix)
                                     for _, prefix in sources}
                self.valid_weights = {source_name(prefix): weight for weight, prefix in sources}

    # --- logging ---------------------------------------------------------------------------------------
    def _open_logs(self):
        import torch.distributed as dist

        cfg = self.config
        config_dict = cfg.to_dict()
        log.info(f"{cfg.model.architecture} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}), "
                 f"masking {cfg.masking.rate:g} {cfg.masking.strategy}, seq {cfg.training.seq_len}, "
                 f"batch {cfg.training.global_batch_size} = {cfg.training.micro_batch_size} x "
                 f"{cfg.gradient_accumulation_steps} accumulation x {cfg.data_parallel_size} DP, "
                 f"TP {cfg.tensor_parallel_size}, ZeRO-{cfg.zero_stage} {config_dict['parallel']['precision']}, "
                 f"lr {cfg.training.lr:g}, {cfg.training.train_steps} steps (launcher: {self.launch.launcher})")
        if self.run_dir is None:
            import json
            log.info("resolved config:\n" + json.dumps(config_dict, indent=2, sort_keys=True))
        else:
            log.info(f"resolved config: {self.run_dir / CONFIG_FILE}")
            if self.is_rank0:
                from pipeline.io import write_json_atomic

                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / STOPPED_BY_SIGNAL_FILE).unlink(missing_ok=True)
                write_json_atomic(self.run_dir / CONFIG_FILE, config_dict)
        self.metrics = MetricsSink(self.run_dir, self.is_rank0, self.step, cfg.training.train_steps,
                                   cfg.runtime.progress_bar)
        dist.barrier()

    # --- one step --------------------------------------------------------------------------------------
    def _next_batch(self):
        batch = next(self.train_iter)
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def _train_step(self, accum):
        """One optimizer step (all micro batches). Statistics accumulate on the device; no host sync here."""
        import torch

        # The learning rate this step uses (the scheduler moves on inside engine.step()).
        self.last_lr = float(self.engine.get_lr()[0])
        for _ in range(self.config.gradient_accumulation_steps):
            batch = self._next_batch()
            output = self.engine(batch)
            self.engine.backward(output.loss)
            self.engine.step()
            with torch.no_grad():
                accum[0] += output.loss.detach().float()
                accum[1:4] += output.loss_sum_by_kind.detach().float()
                accum[4:7] += output.count_by_kind.detach().float()
                accum[7] += 1
        self.step += 1
        self.consumed_samples += self.config.training.global_batch_size

    def _reduce_over_data_parallel(self, tensor):
        import torch.distributed as dist

        if self.config.data_parallel_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def _loss_scale(self):
        if not self.engine.fp16_enabled():
            return None
        for name in ("cur_scale", "loss_scale"):
            value = getattr(self.engine.optimizer, name, None)
            if value is not None:
                return float(value)
        return None

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        if not isinstance(self.valid_loader, dict):
            return self._evaluate_loader(self.valid_loader)
        # A blend: every source's record, and the blended loss = the weights' mean of the sources' losses.
        records = {name: self._evaluate_loader(loader) for name, loader in self.valid_loader.items()}
        loss = sum(self.valid_weights[name] * record["loss"] for name, record in records.items())
        blended = {"kind": "eval", "step": self.step, "loss": loss, "ppl": safe_exp(loss)}
        for label in KIND_LABELS:  # per corruption kind, blended the same way where every source has it
            losses = [record[f"loss_{label}"] for record in records.values()]
            if all(value is not None for value in losses):
                kind_loss = sum(self.valid_weights[name] * value for name, value in zip(records, losses))
                blended[f"loss_{label}"], blended[f"ppl_{label}"] = kind_loss, safe_exp(kind_loss)
        for name, record in records.items():
            blended[f"loss_{name}"] = record["loss"]
            blended[f"ppl_{name}"] = record["ppl"]
            log.info(f"validation step {self.step} source {name} (weight {self.valid_weights[name]:.3g}): "
                     f"loss={record['loss']:.4f} ppl={record['ppl']:.2f}")
        counts = self.train_loader.dataset.source_counts(self.consumed_samples)
        log.info("samples per source so far: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
        return blended

    def _evaluate_loader(self, loader) -> dict:
        import torch

        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        self.engine.eval()
        with self._fork_rng(), torch.no_grad():
            for batch in loader:
                if self.device.type != "cpu":
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                output = self.engine(batch)
                sums[0:3] += output.loss_sum_by_kind.double()
                sums[3:6] += output.count_by_kind.double()
        self.engine.train()
        totals = self._reduce_over_data_parallel(sums).tolist()
        loss_sums, counts = totals[0:3], totals[3:6]
        loss = sum(loss_sums) / max(sum(counts), 1.0)
        record = {"kind": "eval", "step": self.step, "loss": loss, "ppl": safe_exp(loss)}
        for label, s, c in zip(KIND_LABELS, loss_sums, counts):
            record[f"loss_{label}"] = s / c if c else None
            record[f"ppl_{label}"] = safe_exp(s / c) if c else None
        return record

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        import torch.distributed as dist

        from pipeline.io import canonical_json_sha256
        from pipeline.training.checkpoint import (FORMAT_VERSION, CheckpointError, capture_rng_state,
                                                  checkpoints_dir, save_checkpoint)

        cfg = self.config
        rng_states = [None] * self.world_size
        dist.all_gather_object(rng_states, capture_rng_state(), group=self.control_group)
        run_config = {
            "format_version": FORMAT_VERSION, "step": self.step, "consumed_samples": self.consumed_samples,
            "data_epoch": self._data_epoch(), "config": cfg.to_dict(),
            "tokenizer_fingerprint": cfg.dataset_meta["tokenizer"]["sha256"],
            "dataset_meta": cfg.dataset_meta, "dataset_fingerprint": canonical_json_sha256(cfg.dataset_meta),
            "world": {"world_size": self.world_size, "tensor_parallel_size": cfg.tensor_parallel_size,
                      "data_parallel_size": cfg.data_parallel_size},
        }

        def pause():
            seconds = pause_seconds(PAUSE_IN_SAVE_ENV, self.step)
            if seconds and self.is_rank0:
                log.info(f"test hook: pausing {seconds:.0f}s inside the save of step {self.step}")
                time.sleep(seconds)

        ckpt_dir = checkpoints_dir(self.run_dir)
        try:
            tag, removed = save_checkpoint(self.engine, ckpt_dir, self.step, dict(run_config, rng_states=rng_states),
                                           run_config, cfg.runtime.keep_last, self.control_group, self.is_rank0,
                                           sha256_all=cfg.runtime.checkpoint_sha256, pause=pause)
        except CheckpointError as error:
            raise AgreedError(str(error)) from None
        log.info(f"saved checkpoint {ckpt_dir / tag}" + (f" (removed {', '.join(removed)})" if removed else ""))
        return tag

    def _data_epoch(self) -> int | None:
        if not self.samples_per_epoch:
            return None
        return self.consumed_samples // self.samples_per_epoch

    # --- the loop --------------------------------------------------------------------------------------
    def _agreed_stop_signal(self) -> str | None:
        """The name of a stop signal any rank received, agreed by all ranks (a signal delivered to only some
        ranks still stops everyone at the same step), or None."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.stop_signal.received or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None

    def train(self) -> int:
        try:
            return self._train()
        finally:
            self.metrics.close()

    def _train(self) -> int:
        import torch
        import torch.distributed as dist

        from pipeline.training.checkpoint import restore_rng_state

        cfg = self.config
        training, runtime = cfg.training, cfg.runtime
        last_step = training.train_steps if runtime.stop_at_step is None else min(training.train_steps,
                                                                                  runtime.stop_at_step)
        if self.rng_states_to_restore is not None:
            restore_rng_state(self.rng_states_to_restore)
        self.engine.train()
        accum = torch.zeros(8, dtype=torch.float32, device=self.device)
        saved_at = self.step if self.resume is not None else None
        stop_reason = None
        if self.step == 0 and self.valid_loader is not None:
            self.metrics.eval_record(self.evaluate())  # the starting point of the validation curve
        window_start, window_steps = time.perf_counter(), 0
        while self.step < last_step:
            self._train_step(accum)
            window_steps += 1
            if self.step % runtime.log_interval == 0 or self.step == last_step:
                values = self._reduce_over_data_parallel(accum.clone()).tolist()
                elapsed = time.perf_counter() - window_start
                self.metrics.train_record(self._train_record(values, window_steps, elapsed))
                accum.zero_()
                window_start, window_steps = time.perf_counter(), 0
            self.metrics.step_done()
            side_work_start = time.perf_counter()
            # Every eval_interval steps, and at the end of training so the curve ends where the model does.
            if self.valid_loader is not None and runtime.eval_interval and (
                    self.step % runtime.eval_interval == 0 or self.step == training.train_steps):
                self.metrics.eval_record(self.evaluate())
            if self.run_dir is not None and self.step % runtime.save_interval == 0:
                self.save_checkpoint()
                saved_at = self.step
            window_start += time.perf_counter() - side_work_start  # throughput counts training time only
            pause_until = time.monotonic() + pause_seconds(PAUSE_AFTER_STEP_ENV, self.step)
            while time.monotonic() < pause_until and not self.stop_signal.received:
                time.sleep(0.05)
            stop_reason = self._agreed_stop_signal()
            if stop_reason is not None:
                break
        if self.run_dir is not None and saved_at != self.step:
            self.save_checkpoint()
        self.metrics.close()
        if stop_reason is not None:
            message = f"stopped by {stop_reason} at step {self.step}"
            if self.is_rank0 and self.run_dir is not None:
                from pipeline.io import write_json_atomic
                from pipeline.training.checkpoint import tag_for_step
                write_json_atomic(self.run_dir / STOPPED_BY_SIGNAL_FILE,
                                  {"signal": stop_reason, "step": self.step, "checkpoint": tag_for_step(self.step)})
            log.info(message + ("; checkpoint saved, resume with --load" if self.run_dir else ""))
        else:
            log.info(f"finished at step {self.step}")
        dist.barrier()
        return 0

    def _train_record(self, values: list[float], steps: int, elapsed: float) -> dict:
        cfg = self.config
        micro_steps = max(values[7], 1.0)
        record = {"kind": "train", "step": self.step, "loss": values[0] / micro_steps, "lr": self.last_lr}
        for i, label in enumerate(KIND_LABELS):
            count = values[4 + i]
            record[f"loss_{label}"] = values[1 + i] / count if count else None
        record["loss_scale"] = self._loss_scale()
        samples = steps * cfg.training.global_batch_size
        record["samples_per_s"] = samples / elapsed if elapsed > 0 else None
        record["tokens_per_s"] = samples * cfg.training.seq_len / elapsed if elapsed > 0 else None
        tflops = self.flops_per_step * steps / elapsed / self.world_size / 1e12 if elapsed > 0 else None
        record["tflops_per_device"] = tflops
        record["mfu"] = tflops / cfg.runtime.peak_tflops if (tflops and cfg.runtime.peak_tflops) else None
        record["consumed_samples"] = self.consumed_samples
        source_counts = getattr(self.train_loader.dataset, "source_counts", None)
        if source_counts is not None:  # a blend: how many samples each corpus gave so far
            record.update({f"samples_{name}": count for name, count in source_counts(self.consumed_samples).items()})
        record["skipped_steps"] = int(getattr(self.engine, "skipped_steps", 0))
        record["time"] = time.time()
        return record


def _samples_per_epoch(loader) -> int | None:
    dataset = getattr(loader, "dataset", None)
    packed = getattr(dataset, "packed", None)
    try:
        return len(packed) if packed is not None else None
    except TypeError:
        return None


def configure(argv: Sequence[str] | None = None) -> ResolvedConfig:
    """The run's configuration from the command line, validated without any process group: a bad option,
    recipe, DeepSpeed JSON or dataset is reported before the distributed start-up."""
    from deepspeed.accelerator import get_accelerator

    from pipeline.data.meta import check_meta_matches_tokenizer, load_meta
    from pipeline.training.distributed import discover_launch

    args = build_parser().parse_args(argv)
    world_size = discover_launch().world_size
    from pipeline.data.blend import parse_data_prefix

    sources = parse_data_prefix(args.data_prefix)
    metas = [check_meta_matches_tokenizer(prefix, args.tokenizer) if args.tokenizer else load_meta(prefix)
             for _, prefix in sources]
    meta = metas[0]
    if len(sources) > 1:  # the blend is part of the data a checkpoint was trained on
        meta = dict(meta, blend=[{"weight": weight, "prefix": prefix, "documents": source["documents"],
                                  "tokens": source["tokens"], "tokenizer_sha256": source["tokenizer"]["sha256"]}
                                 for (weight, prefix), source in zip(sources, metas)])
    accelerator = get_accelerator()
    return resolve_config(args, world_size, meta, accelerator.device_name(), accelerator.is_fp16_supported(),
                          accelerator.is_bf16_supported())


def main(argv: Sequence[str] | None = None) -> int:
    """``run_pretrain.py`` / ``python -m pipeline train``: configure, then train. Run through
    ``pipeline.errors.run_cli`` (one line for a user-fixable error)."""
    config = configure(argv)
    trainer = None
    try:
        trainer = Trainer(config)
        return trainer.train()
    except AgreedError:
        if trainer is not None and not trainer.is_rank0:
            return 1  # rank 0 reports it
        raise
    finally:
        ignore_late_preemption_warning()
        # Tear the process groups down before the interpreter exits: left to static destruction, a backend thread
        # still joinable aborted a finished rank ("terminate called without an active exception", seen on the
        # 4-node Slurm test after a pre-emption save), and srun then cancels the whole step.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
