"""Tensor parallelism set-up: megatron-core process groups, a CPU-capable RNG tracker, DeepSpeed's mpu adapter.

RNG streams (the megatron-core convention):

* the *default* generator (``torch``'s CPU generator, or the CUDA one on GPU) is seeded identically on the
  tensor-parallel ranks of one data-parallel replica, so dropout on *replicated* activations (embeddings,
  residual branches after a row-parallel all-reduce, the decoder input) draws the same mask on every TP rank,
  as it must for the ranks to stay in sync. Data-parallel replicas get different seeds.
* the *model-parallel* stream ("model-parallel-rng" in the tracker) is seeded differently on each TP rank and
  is used, through ``get_cuda_rng_tracker().fork()``, for dropout on *TP-split* activations (attention
  probabilities of the heads a rank owns), so the shards do not repeat each other's masks.

megatron's own tracker (``CudaRNGStatesTracker``) stores CUDA generator states and needs a GPU; without one we
register ``CpuRNGStatesTracker`` in its place, so ``megatron.core.tensor_parallel.get_cuda_rng_tracker()``
returns it and every user of the tracker (ours and megatron's) works on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as megatron_random

from pipeline.compat import install_megatron_rng_tracker, megatron_rng_tracker_names

MODEL_PARALLEL_RNG, DATA_PARALLEL_RNG, EXPERT_PARALLEL_RNG = megatron_rng_tracker_names()
# Same offsets as megatron's model_parallel_cuda_manual_seed, so CPU and GPU runs use the same seeds.
_TP_SEED_OFFSET = 2718
# Different dropout masks per data-parallel replica (megatron seeds them equally; nothing needs that).
_DP_SEED_STRIDE = 100_003


class CpuRNGStatesTracker:
    """``CudaRNGStatesTracker`` over the CPU generator: named generator states that ``fork()`` swaps in.

    Hand-written because megatron-core's tracker only swaps CUDA generator states; the CPU runs (tests, CI) need
    the same named streams for TP dropout.

    Same interface as megatron's (``reset``, ``is_initialized``, ``get_states``, ``set_states``, ``add``,
    ``fork``), so megatron code that calls ``get_cuda_rng_tracker().fork()`` uses it transparently.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]):
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already used by the tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} has not been added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def get_rng_tracker():
    """The tracker megatron-core and our layers use (``get_cuda_rng_tracker()``)."""
    return megatron_random.get_cuda_rng_tracker()


def model_runs_on_cuda() -> bool:
    """True when the model runs on a GPU: CUDA is present and ``DS_ACCELERATOR`` is not ``cpu`` (the project's
    switch; CPU tests on a GPU machine then still get the CPU tracker their dropout draws from)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda").lower() != "cpu"


def seed_model_parallel_rng(seed: int) -> None:
    """Seeds the default generator (equal on the TP ranks of a replica) and the tracker's streams.

    Needs ``parallel_state`` initialised. On CUDA this is megatron's ``model_parallel_cuda_manual_seed``; on CPU
    the same seeds go into a ``CpuRNGStatesTracker``.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    default_seed = seed + _DP_SEED_STRIDE * dp_rank
    torch.manual_seed(default_seed)
    if model_runs_on_cuda():
        megatron_random.model_parallel_cuda_manual_seed(default_seed, force_reset_rng=True)
        return
    tracker = CpuRNGStatesTracker()
    tracker.add(DATA_PARALLEL_RNG, default_seed)
    tracker.add(MODEL_PARALLEL_RNG, default_seed + _TP_SEED_OFFSET + tp_rank)
    tracker.add(EXPERT_PARALLEL_RNG, default_seed + 1024)
    install_megatron_rng_tracker(tracker)


def initialize_model_parallel(tensor_parallel_size: int = 1, seed: int = 1234) -> None:
    """Creates megatron-core's tensor/data-parallel groups and seeds the RNG streams (see module docstring).

    ``torch.distributed`` must be initialised (any backend; gloo on CPU). The world size must be a multiple
    of ``tensor_parallel_size``; consecutive ranks form a TP group, the rest is data parallelism.
    Calling it again re-creates the groups (tests run several configurations in one process).
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or initialize_single_process())")
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             create_gloo_process_groups=False)
    seed_model_parallel_rng(seed)


def initialize_single_process(seed: int = 1234) -> None:
    """For tools, tests and the export on one process: a world of one (gloo, in-memory store) and TP=1."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=5))
    initialize_model_parallel(1, seed)


def get_rng_tracker_states() -> dict:
    """Every torch RNG state the model's randomness depends on, for an exact resume: the default CPU generator,
    the current CUDA generator (if any) and the tracker's named streams. Per rank (TP ranks differ)."""
    states = {"cpu": torch.get_rng_state().clone(), "tracker": get_rng_tracker().get_states()}
    if model_runs_on_cuda() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state().clone()
    return states


def set_rng_tracker_states(states: dict) -> None:
    """Restores what ``get_rng_tracker_states`` returned on the same rank."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and model_runs_on_cuda():
        torch.cuda.set_rng_state(states["cuda"])
    tracker = get_rng_tracker()
    tracker_states = states["tracker"]
    if isinstance(tracker, CpuRNGStatesTracker):
        tracker.set_states(tracker_states)
    else:  # megatron's CUDA tracker keeps references; give it its own copies
        tracker.set_states({name: state.clone() for name, state in tracker_states.items()})


class MegatronMpuForDeepSpeed:
    """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` expects, backed by megatron-core's parallel_state.

    DeepSpeed uses it to all-reduce gradients over the data-parallel group only, to compute the gradient norm
    over model-parallel shards, and to name checkpoint files per model-parallel rank.
    """

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    # Newer DeepSpeed code asks for the tensor-parallel names as well; they are the same groups here.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 of this rank's TP group (DeepSpeed broadcasts inputs from it)."""
        return parallel_state.get_tensor_model_parallel_src_rank()

    # One pipeline stage.
    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()
