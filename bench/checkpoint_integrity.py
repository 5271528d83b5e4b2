"""What a checkpoint's integrity check costs, at the base preset's checkpoint size, measured in one run.

A synthetic checkpoint of real ``torch.save`` files (random fp32 tensors, as DeepSpeed writes them) the size of
the base preset's ZeRO-2 fp32 checkpoint: ~125M parameters -> module weights (4 bytes each) in
``mp_rank_00_model_states.pt``, fp32 master weights + Adam's two moments (12 bytes each) in the optimizer file.
Timed, on rank 0's side of the save (all ranks wait for it) and of the resume:

* save, default: ``build_manifest`` -- sizes, sha256 of the small files only;
* save, ``--checkpoint-sha256``: sha256 of every byte (what every save did before);
* load: ``verify_checkpoint`` of each manifest (CRC-32 of every torch record, or sha256 of every byte).

    python -m bench.checkpoint_integrity --params 125e6 --dir /tmp/ckpt_bench
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from pipeline.training import checkpoint as ckpt


def write_synthetic_checkpoint(tag_dir: Path, params: int) -> int:
    """The files of one ZeRO-2 fp32 checkpoint of a ``params``-parameter model; returns the bytes written."""
    tag_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    chunk = 1 << 24  # tensors of 16M elements, as a model's are many tensors
    module = {f"layer{i}.weight": torch.randn(min(chunk, params - i * chunk), generator=generator)
              for i in range((params + chunk - 1) // chunk)}
    torch.save({"module": module, "step": 1000}, tag_dir / "mp_rank_00_model_states.pt")
    state = {name: {"master": t.clone(), "exp_avg": torch.randn(t.shape, generator=generator),
                    "exp_avg_sq": torch.rand(t.shape, generator=generator)} for name, t in module.items()}
    torch.save({"optimizer_state_dict": state}, tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag_dir / "run_config.json").write_text('{"step": 1000}\n')
    return sum(p.stat().st_size for p in tag_dir.iterdir())


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_integrity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=125e6, help="model parameters (base preset: ~125M)")
    parser.add_argument("--dir", default="/tmp/checkpoint_integrity_bench", help="scratch directory (removed)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings (page cache warm after the first)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    tag_dir = root / "step_00001000"
    try:
        size = write_synthetic_checkpoint(tag_dir, int(args.params))
        default_s = timed(lambda: ckpt.build_manifest(tag_dir, 1000), args.repeats)
        sha_s = timed(lambda: ckpt.build_manifest(tag_dir, 1000, sha256_all=True), args.repeats)
        from pipeline.io import write_json_atomic
        rows = [("save: sizes + small-file sha256 (default)", default_s),
                ("save: sha256 of every byte (--checkpoint-sha256; before: every save)", sha_s)]
        for label, sha256_all in (("load: verify CRC-32 of every torch record (default)", False),
                                  ("load: verify sha256 of every byte", True)):
            write_json_atomic(tag_dir / ckpt.MANIFEST_FILE, ckpt.build_manifest(tag_dir, 1000, sha256_all))
            assert ckpt.verify_checkpoint(tag_dir) is None
            rows.append((label, timed(lambda: ckpt.verify_checkpoint(tag_dir), args.repeats)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"synthetic base-preset checkpoint: {args.params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB")
    print("| check | seconds | GiB/s | vs sha256 at save |")
    print("|---|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {size / 2**30 / seconds:.2f} | {seconds / sha_s:.4f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
