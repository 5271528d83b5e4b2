"""bench/hf_plateau.py (the Hugging Face RoBERTa reference for the demo's plateau, README): its corruption follows
BERT's rule, and it trains ``RobertaForMaskedLM`` on a preprocessed dataset's token stream."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hf_plateau import corrupt  # noqa: E402


def test_corruption_is_berts_rule():
    ids = torch.randint(5, 1000, (400, 128), generator=torch.Generator().manual_seed(0))
    inputs, labels, masked = corrupt(ids, 0.4, 4, 1000, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.4) < 0.01
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    assert torch.equal(masked, inputs == 4) and not masked[~chosen].any()
    kept_or_replaced = chosen & ~masked
    replaced = kept_or_replaced & (inputs != ids)  # a random id equal to the true one counts as kept (1 in 995)
    shares = [masked.sum() / chosen.sum(), replaced.sum() / chosen.sum()]
    assert abs(shares[0].item() - 0.8) < 0.01 and abs(shares[1].item() - 0.1) < 0.01, shares
    assert inputs[replaced].min() >= 5 and inputs[replaced].max() < 1000


def test_reference_trains_on_a_dataset(run_bench_script, tiny_dataset_prefix):
    result = run_bench_script("hf_plateau", "--data-prefix", str(tiny_dataset_prefix), "--steps", "30", "--batch",
                              "8", "--seq-len", "64", "--layers", "1", "--hidden", "64", "--eval-interval", "30",
                              "--eval-sequences", "32")
    first, last = result["records"][0], result["records"][-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert last["ppl_masked"] < 0.5 * first["ppl_masked"], result["records"]
    assert 1.0 < result["unigram_perplexity"] < first["ppl_masked"]  # an untrained model is worse than unigram
